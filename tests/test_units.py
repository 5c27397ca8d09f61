"""Acoustic unit extraction: dedup, encoder features (Whisper window trimming, HuBERT), k-means, fairseq km import."""

import json
import os
import pickle

import numpy as np
import pytest
import torch
from transformers import (
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WhisperConfig,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from modeling_echox.units.extractor import EchoXUnitExtractor
from modeling_echox.units.fairseq_kmeans import load_fairseq_kmeans_centroids
from modeling_echox.units.kmeans import (
    UNIT_KMEANS_CONFIG_FILE,
    UNIT_KMEANS_FILE,
    EchoXUnitKMeans,
    assign_units,
    deduplicate_units,
    fit_kmeans,
)


def tiny_whisper_encoder(seed: int = 0) -> WhisperEncoder:
    torch.manual_seed(seed)
    config = WhisperConfig(
        num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        max_source_positions=50,  # a 1 s window (100 mel frames → 50 encoder frames)
    )
    return WhisperEncoder(config).eval()


def tiny_hubert(seed: int = 0) -> HubertModel:
    torch.manual_seed(seed)
    config = HubertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(16, 20), conv_kernel=(16, 20),  # 320 samples per frame → 50 Hz
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )
    return HubertModel(config).eval()


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 16000))
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.normal(size=n)).astype(np.float32)


def blobs(n: int = 600, dim: int = 8, k: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 6
    labels = rng.integers(0, k, size=n)
    return (centers[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


# ---------------------------------------------------------------------------------------------------- dedup
def test_deduplicate_units_and_durations():
    units, durations = deduplicate_units([5, 5, 5, 2, 2, 7, 5, 5])
    assert units.tolist() == [5, 2, 7, 5]
    assert durations.tolist() == [3, 2, 1, 2]
    assert int(durations.sum()) == 8
    units, durations = deduplicate_units(torch.tensor([4]))
    assert units.tolist() == [4] and durations.tolist() == [1]
    units, durations = deduplicate_units([])
    assert units.numel() == 0 and durations.numel() == 0
    with pytest.raises(ValueError, match="1-D"):
        deduplicate_units([[1, 2]])
    with pytest.raises(ValueError, match="integer"):
        deduplicate_units([1.5, 2.0])


# ---------------------------------------------------------------------------------------------------- extractor
def test_whisper_extractor_trims_the_padded_window():
    encoder = tiny_whisper_encoder()
    extractor = EchoXUnitExtractor(encoder, layer=-1)
    assert extractor.layer == 2 and extractor.frame_rate == 50.0
    audio = clip(0.5)
    features = extractor.extract_features(audio)
    assert features.shape == (25, 32)  # 0.5 s at 50 Hz, not the 50 frames of the padded 1 s window
    # the kept frames are the first frames of the full padded-window pass
    mel = extractor.feature_extractor(audio, sampling_rate=16000, padding="max_length", max_length=16000,
                                      return_tensors="pt").input_features
    with torch.no_grad():
        full = encoder(mel).last_hidden_state[0]
    assert full.shape[0] == 50
    torch.testing.assert_close(features, full[:25])
    # odd lengths round up (a partial last frame counts) and long clips run window by window
    assert extractor.extract_features(clip(0.501)).shape[0] == 26
    long = clip(2.3)
    long_features = extractor.extract_features(long)
    assert long_features.shape == (115, 32)
    torch.testing.assert_close(long_features[:50], extractor.extract_features(long[:16000]))


def test_whisper_layer_choice_and_model_wrappers():
    encoder = tiny_whisper_encoder()
    audio = clip(0.4)
    first = EchoXUnitExtractor(encoder, layer=1).extract_features(audio)
    last = EchoXUnitExtractor(encoder, layer=2).extract_features(audio)
    assert first.shape == last.shape == (20, 32)
    assert not torch.allclose(first, last)
    from transformers import WhisperModel

    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_source_positions=50, vocab_size=100,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                       decoder_start_token_id=1))
    wrapped = EchoXUnitExtractor(model, layer=-1)
    assert type(wrapped.encoder).__name__ == "WhisperEncoder"
    assert wrapped.extract_features(audio).shape == (20, 32)


def test_hubert_and_wav2vec2_extractors():
    hubert = tiny_hubert()
    extractor = EchoXUnitExtractor(hubert, layer=2)
    assert extractor.frame_rate == 50.0 and extractor.num_layers == 3
    audio = clip(1.0)
    features = extractor.extract_features(audio)
    with torch.no_grad():
        reference = hubert(torch.from_numpy(audio)[None], output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(features, reference)
    assert features.shape == (int(hubert._get_feat_extract_output_lengths(16000)), 32)
    torch.manual_seed(0)
    wav2vec2 = Wav2Vec2Model(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(16, 20), conv_kernel=(16, 20), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )).eval()
    w2v = EchoXUnitExtractor(wav2vec2, layer=0)
    assert w2v.feature_extractor.do_normalize  # layer-norm wav2vec2 checkpoints expect normalised input
    assert w2v.extract_features(audio).shape[1] == 32


def test_extractor_units_end_to_end_and_save_load(tmp_path):
    extractor = EchoXUnitExtractor(tiny_hubert(), layer=3)
    clips = [clip(1.0, 0), clip(0.7, 1), clip(1.3, 2)]
    kmeans = extractor.fit_kmeans(clips, 5, backend="torch")
    assert kmeans.num_units == 5 and kmeans.layer == 3 and kmeans.encoder_info["model_type"] == "hubert"
    frames = extractor.frame_units(clips[0])
    units, durations = extractor(clips[0])
    assert int(durations.sum()) == frames.numel() == extractor.extract_features(clips[0]).shape[0]
    assert torch.equal(torch.repeat_interleave(units, durations), frames)
    assert (units[1:] != units[:-1]).all()
    batch = extractor(clips)
    assert len(batch) == 3 and torch.equal(batch[0][0], units)

    extractor.save_pretrained(tmp_path)
    assert {UNIT_KMEANS_FILE, UNIT_KMEANS_CONFIG_FILE} <= set(os.listdir(tmp_path))
    info = json.loads((tmp_path / UNIT_KMEANS_CONFIG_FILE).read_text())
    assert info["layer"] == 3 and info["num_units"] == 5 and info["encoder"]["hidden_size"] == 32
    reloaded = EchoXUnitExtractor.from_pretrained(tmp_path, tiny_hubert())
    assert reloaded.layer == 3
    assert torch.equal(reloaded.kmeans.centroids, kmeans.centroids)
    assert torch.equal(reloaded(clips[0])[0], units)
    with pytest.raises(ValueError, match="hidden_size|num_layers|model_type|dimension"):
        EchoXUnitExtractor.from_pretrained(tmp_path, tiny_whisper_encoder())


def test_extractor_bad_inputs():
    extractor = EchoXUnitExtractor(tiny_whisper_encoder(), layer=-1)
    with pytest.raises(ValueError, match="empty"):
        extractor.extract_features(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="floating point"):
        extractor.extract_features(np.zeros(1600, dtype=np.int16))
    with pytest.raises(ValueError, match="1-D"):
        extractor.extract_features(np.zeros((2, 1600), dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        extractor.extract_features(np.full(1600, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="numpy array"):
        extractor.extract_features("speech.wav")
    with pytest.raises(ValueError, match="16000"):
        extractor.extract_features(clip(0.2), sampling_rate=8000)
    with pytest.raises(ValueError, match="audio\\[1\\]"):
        extractor.extract_features([clip(0.2), np.zeros(0, dtype=np.float32)])
    with pytest.raises(ValueError, match="no k-means"):
        extractor(clip(0.2))
    for layer in (3, -4, 10):
        with pytest.raises(ValueError, match="out of range"):
            EchoXUnitExtractor(tiny_whisper_encoder(), layer=layer)
    with pytest.raises(ValueError, match="dimension"):
        extractor.set_kmeans(EchoXUnitKMeans(torch.randn(4, 16), layer=2))
    with pytest.raises(ValueError, match="layer"):
        extractor.set_kmeans(EchoXUnitKMeans(torch.randn(4, 32), layer=1))
    with pytest.raises(ValueError, match="too short"):
        EchoXUnitExtractor(tiny_hubert()).extract_features(np.zeros(100, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------- k-means
def test_fit_kmeans_torch_backend_finds_the_blobs_and_round_trips(tmp_path):
    x, labels = blobs()
    kmeans = fit_kmeans(x, 6, backend="torch", layer=4, encoder_info={"model_type": "whisper"})
    predicted = kmeans.assign(x).numpy()
    # every true blob maps to exactly one unit
    assert all(len(set(predicted[labels == j])) == 1 for j in range(6))
    assert len(set(predicted)) == 6
    kmeans.save_pretrained(tmp_path)
    loaded = EchoXUnitKMeans.from_pretrained(tmp_path)
    assert loaded.layer == 4 and loaded.encoder_info == {"model_type": "whisper"}
    assert torch.equal(loaded.centroids, kmeans.centroids)
    assert torch.equal(loaded.assign(x), kmeans.assign(x))
    # a list of per-clip features is the same as their concatenation
    parts = fit_kmeans([x[:300], x[300:]], 6, backend="torch")
    torch.testing.assert_close(parts.centroids, fit_kmeans(x, 6, backend="torch").centroids)


def test_fit_kmeans_bad_inputs():
    x, _ = blobs(n=10)
    with pytest.raises(ValueError, match="larger than the number of frames"):
        fit_kmeans(x, 11, backend="torch")
    with pytest.raises(ValueError, match="positive integer"):
        fit_kmeans(x, 0)
    with pytest.raises(ValueError, match="2-D"):
        fit_kmeans(x[0], 2)
    with pytest.raises(ValueError, match="floating-point"):
        fit_kmeans(x.astype(np.int64), 2)
    with pytest.raises(ValueError, match="empty"):
        fit_kmeans(np.zeros((0, 8), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="backend"):
        fit_kmeans(x, 2, backend="kmeans-gpu")
    with pytest.raises(ValueError, match="different feature sizes"):
        fit_kmeans([x, x[:, :4]], 2)
    with pytest.raises(ValueError, match="dimension 4 but the k-means centroids have dimension 8"):
        assign_units(torch.randn(3, 4), torch.randn(5, 8))


def test_torch_assignment_matches_sklearn_predict():
    pytest.importorskip("sklearn")
    x, _ = blobs(n=600, dim=16, k=12, seed=1)
    kmeans = fit_kmeans(x, 12, backend="sklearn", batch_size=200, max_iter=3, max_no_improvement=3)
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=12, random_state=0, n_init=1, batch_size=200, max_iter=3).fit(x)
    np.testing.assert_array_equal(assign_units(x, torch.from_numpy(model.cluster_centers_)).numpy(), model.predict(x))
    np.testing.assert_array_equal(
        kmeans.assign(x).numpy(), np.argmin(((x[:, None] - kmeans.centroids.numpy()[None]) ** 2).sum(-1), axis=1)
    )


def test_torch_assignment_matches_faiss():
    faiss = pytest.importorskip("faiss")
    x, _ = blobs(n=2000, dim=16, k=12, seed=2)
    kmeans = fit_kmeans(x, 12, backend="faiss", max_iter=10)
    index = faiss.IndexFlatL2(16)
    index.add(kmeans.centroids.numpy())
    _, nearest = index.search(x, 1)
    np.testing.assert_array_equal(kmeans.assign(x).numpy(), nearest[:, 0])


# ---------------------------------------------------------------------------------------------------- fairseq km.bin
def test_fairseq_km_import_with_joblib_and_pickle(tmp_path):
    pytest.importorskip("sklearn")
    import joblib
    from sklearn.cluster import MiniBatchKMeans

    x, _ = blobs(n=500, dim=8, k=5, seed=3)
    # fairseq's learn_kmeans.py settings
    model = MiniBatchKMeans(n_clusters=5, init="k-means++", max_iter=10, batch_size=100, tol=0.0,
                            max_no_improvement=100, n_init=2, reassignment_ratio=0.0, random_state=0).fit(x)
    paths = {
        "joblib": tmp_path / "km.bin",
        "joblib_zlib": tmp_path / "km_zlib.bin",
        "pickle": tmp_path / "km.pkl",
        "pickle_p2": tmp_path / "km_p2.pkl",
    }
    joblib.dump(model, paths["joblib"])
    joblib.dump(model, paths["joblib_zlib"], compress=3)
    paths["pickle"].write_bytes(pickle.dumps(model, protocol=5))
    paths["pickle_p2"].write_bytes(pickle.dumps(model, protocol=2))
    for path in paths.values():
        centroids = load_fairseq_kmeans_centroids(path)
        np.testing.assert_allclose(centroids, model.cluster_centers_.astype(np.float32))
    kmeans = EchoXUnitKMeans.from_fairseq(paths["joblib"], layer=11)
    assert kmeans.layer == 11 and kmeans.num_units == 5 and kmeans.encoder_info["file"] == "km.bin"
    np.testing.assert_array_equal(kmeans.assign(x).numpy(), model.predict(x))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickles_are_refused(tmp_path, monkeypatch):
    evil = tmp_path / "km.bin"
    evil.write_bytes(pickle.dumps({"cluster_centers_": _Evil()}))
    calls = []
    monkeypatch.setattr(os, "system", lambda command: calls.append(command) or 0)
    with pytest.raises(ValueError, match="refusing to load 'posix.system'|refusing to load 'os.system'") as info:
        load_fairseq_kmeans_centroids(evil)
    assert "centroids.npy" in str(info.value)  # the message explains the .npy route
    # a class hidden inside an otherwise valid-looking estimator
    import builtins

    crafted = tmp_path / "km2.bin"
    crafted.write_bytes(
        b"\x80\x02cbuiltins\neval\nq\x00X\x0c\x00\x00\x00print('hi')q\x01\x85q\x02Rq\x03."
    )
    with pytest.raises(ValueError, match="refusing to load 'builtins.eval'"):
        load_fairseq_kmeans_centroids(crafted)
    assert calls == [] and builtins is not None
    # BUILD on a class object (would monkeypatch the stand-in class for later loads)
    patch = tmp_path / "km4.bin"
    patch.write_bytes(b"\x80\x02cjoblib.numpy_pickle\nNumpyArrayWrapper\nN}X\x04\x00\x00\x00readNs\x86b.")
    with pytest.raises(ValueError, match="state of a class"):
        load_fairseq_kmeans_centroids(patch)
    with pytest.raises(ValueError, match="holds no fitted k-means"):
        plain = tmp_path / "km3.bin"
        plain.write_bytes(pickle.dumps({"a": 1}))
        load_fairseq_kmeans_centroids(plain)
    with pytest.raises(OSError):
        load_fairseq_kmeans_centroids(tmp_path / "missing.bin")


def test_from_numpy(tmp_path):
    centroids = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    np.save(tmp_path / "centroids.npy", centroids)
    kmeans = EchoXUnitKMeans.from_numpy(tmp_path / "centroids.npy", layer=6)
    assert kmeans.num_units == 7 and kmeans.dim == 3 and kmeans.layer == 6
    np.testing.assert_array_equal(kmeans.centroids.numpy(), centroids)
