"""The notebooks in notebooks/ execute top to bottom on a python3 kernel, and say the right things.

Each notebook runs with nbclient (as CI does: `python -m pytest -q tests`) in a temporary working
directory; any cell error fails the test. Notebooks 2 and 3 run with a shorter joint training
(``CI_PARAMETERS``, appended to the cell tagged ``parameters`` as papermill injects parameters) to
keep the suite within its time budget; the numbers they must show hold at that length too. Every notebook ends with a
``RESULTS {json}`` line, whose numbers are checked against what the methods must do (and against
each other: notebook 3 resumes notebook 2's joint model, so they report the same joint BER).
"""

import json
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("01_composing_losses.ipynb", "02_train_and_decouple.ipynb", "03_posthoc_sweeps.ipynb")


def read(name):
  return nbformat.read(os.path.join(NB_DIR, name), as_version=4)


CI_PARAMETERS = {"02_train_and_decouple.ipynb": "MAX_STEPS = 70\nSTAGE_STEPS = 200",
                 "03_posthoc_sweeps.ipynb": "MAX_STEPS = 70"}  # the same joint run (notebook 3 resumes it)


def execute(name, cwd, monkeypatch):
  """Runs a notebook in ``cwd`` and returns it with its outputs (raises on a cell error)."""
  monkeypatch.setenv("LT_JAX_ROOT", ROOT)  # the kernel finds lt_jax/ and configs/ here
  nb = read(name)
  if name in CI_PARAMETERS:
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source += "\n# injected by tests/test_notebooks.py\n" + CI_PARAMETERS[name]
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()
  return nb


def stdout(nb):
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.output_type == "stream" and o.name == "stdout")


def results(nb):
  """The JSON of the ``RESULTS {...}`` line the last code cell prints."""
  last = [c for c in nb.cells if c.cell_type == "code"][-1]
  text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
  match = re.search(r"^RESULTS (\{.*\})$", text, re.M)
  assert match, f"no RESULTS line in the last cell's output:\n{text}"
  return json.loads(match.group(1))


def images(nb):
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))


def test_every_notebook_is_tested_and_saved_clean():
  assert sorted(n for n in os.listdir(NB_DIR) if n.endswith(".ipynb")) == sorted(NOTEBOOKS)
  for name in NOTEBOOKS:
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name} has outputs"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "colab.research.google.com" in first.source
    assert f"notebooks/{name}" in first.source, "Colab link points at another notebook"
    assert '"google.colab" in sys.modules' in code[0].source       # install cell, Colab only
    assert "jax.devices()" in code[1].source
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name}: needs exactly one cell tagged 'parameters'"


def test_composing_losses_notebook(tmp_path, monkeypatch):
  nb = execute(NOTEBOOKS[0], tmp_path, monkeypatch)
  out = stdout(nb)
  diffs = re.search(r"LA ([\d.e+-]+), weighted CE ([\d.e+-]+), LDAM ([\d.e+-]+)", out)
  assert diffs and max(float(d) for d in diffs.groups()) < 1e-5  # registry == hand composition (relative, f32)
  assert images(nb) == 1
  r = results(nb)
  bayes, ber = r["bayes_ber"], {k: v["ber"] for k, v in r["losses"].items()}
  # Two isotropic blobs at distance d are confused with probability Phi(-d / (2 sigma)); the
  # three pairs here (d = 2, 1.97, 1.97; sigma 0.9) give a Bayes BER of about 0.23.
  assert 0.20 < bayes < 0.26
  assert set(ber) >= {"CE", "weighted CE", "focal (γ=2)", "LDAM", "LDAM-DRW", "logit-adjusted (τ=1)",
                      "balanced softmax", "LA ∘ focal (composed)", "CE + post-hoc LA"}
  for name, value in ber.items():  # no model beats Bayes beyond test-sample noise (3000 points)
    assert bayes - 0.03 < value < 0.67, (name, value)
  ce = r["losses"]["CE"]
  assert ce["recall"][2] < 0.3 and ce["ber"] > 0.38  # CE ignores the 10-example class
  for name in ("weighted CE", "logit-adjusted (τ=1)", "balanced softmax", "LA ∘ focal (composed)",
               "CE + post-hoc LA"):
    assert ber[name] < ce["ber"] - 0.05, name
    assert r["losses"][name]["recall"][2] > ce["recall"][2] + 0.15, name
  for name, v in r["losses"].items():  # BER = 1 - mean recall, accuracy on a balanced test set = 1 - BER
    assert v["ber"] == pytest.approx(1 - sum(v["recall"]) / 3, abs=2e-4), name
    assert v["accuracy"] == pytest.approx(1 - v["ber"], abs=2e-4), name


def test_decoupling_then_sweep_notebooks(tmp_path, monkeypatch):
  # One working directory: notebook 3 resumes the joint run notebook 2 finished (same config).
  nb2 = execute(NOTEBOOKS[1], tmp_path, monkeypatch)
  r2 = results(nb2)
  assert images(nb2) == 1
  assert "frozen leaves unchanged: True" in stdout(nb2)
  ber = r2["ber"]
  joint = ber["joint (CE)"]
  assert 0.12 < joint < 0.45, joint
  assert ber["cRT"] < joint - 0.03 and ber["LWS"] < joint - 0.02 and ber["NCM"] < joint
  tau_key = next(k for k in ber if k.startswith("τ-norm"))
  assert 0.0 <= r2["tau"] <= 2.0 and ber[tau_key] <= joint + 0.01
  # cRT and LWS undo the head-class bias of the norms: their norms no longer grow with n_c.
  corr = r2["norm_corr"]
  assert corr["cRT"] < corr["joint (CE)"] and corr["LWS"] < corr["joint (CE)"]

  nb3 = execute(NOTEBOOKS[2], tmp_path, monkeypatch)
  r3 = results(nb3)
  assert images(nb3) == 1
  assert "resumed from" in stdout(nb3)
  assert r3["joint_test_ber"] == pytest.approx(joint, abs=1e-4)  # the same model
  ph, tn = r3["posthoc"], r3["tau_norm"]
  assert 0.0 < ph["tau"] <= 3.0
  assert ph["test_ber"] < r3["joint_test_ber"] - 0.03   # post-hoc LA helps a CE model
  assert tn["test_ber"] <= r3["joint_test_ber"] + 0.01
  if tn["tau"] == r2["tau"]:  # same tau from the same validation split: the sweep (nb 3) and
    # heads.tau_norm_logits + metrics (nb 2) must agree on the test BER
    assert tn["test_ber"] == pytest.approx(ber[tau_key], abs=1e-4)
