"""
Spoken-QA accuracy as an `evaluate` metric, the rule `echox eval` uses:

    import evaluate, modeling_echox.evaluation.metrics
    metric = evaluate.load(modeling_echox.evaluation.metrics.SPOKEN_QA_METRIC)   # a local path, nothing is downloaded
    metric.compute(predictions=["the capital of kenya is nairobi"], references=[["nairobi"]])
    # {"accuracy": 1.0, "accuracy_all_words": 1.0}

`predictions`: model answers (text, or the ASR transcript of the spoken answer); `references`: the gold answers of
each question. "accuracy": a gold answer occurs in the normalized prediction as a run of whole words;
"accuracy_all_words": each of its words occurs somewhere.
"""

import datasets
import evaluate

from modeling_echox.evaluation.text_metrics import is_correct

_DESCRIPTION = "Spoken-QA accuracy: whole-word containment of any gold answer in the normalized prediction."
_CITATION = """@article{echox2025, title={EchoX: Towards Mitigating Acoustic-Semantic Gap via Echo Training for
Speech-to-Speech LLMs}, journal={arXiv preprint arXiv:2509.09174}, year={2025}}"""
_INPUTS = """predictions (list of str): answers or transcripts. references (list of list of str): gold answers."""


class EchoxSpokenQa(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("No predictions to score.")
        contained = [is_correct(list(refs), pred, "contained") for pred, refs in zip(predictions, references)]
        all_words = [is_correct(list(refs), pred, "all_words") for pred, refs in zip(predictions, references)]
        return {"accuracy": sum(contained) / len(contained), "accuracy_all_words": sum(all_words) / len(all_words)}
