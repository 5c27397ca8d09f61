"""`evaluate` metrics shipped with echox, loadable from their local paths (`evaluate.load(SPOKEN_QA_METRIC)`)."""

import os

SPOKEN_QA_METRIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "echox_spoken_qa.py")
