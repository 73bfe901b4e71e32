"""docs/tutorial.ipynb runs headlessly, every cell without error."""
import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "tutorial.ipynb")


def test_tutorial_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_TUTORIAL_STEPS", "30")
    monkeypatch.setenv("VLMKIT_TUTORIAL_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    # A kernel on this interpreter (the one vlmkit is installed in).
    spec = tmp_path / "jupyter" / "kernels" / "vlmkit-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-Xfrozen_modules=off", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "vlmkit test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="vlmkit-test",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "reloaded model gives identical logits" in outputs
    assert (tmp_path / "run" / "tutorial_predictions.png").exists()
    assert (tmp_path / "run" / "tutorial_masks.png").exists()
    assert (tmp_path / "run" / "tutorial_loss.png").exists()
