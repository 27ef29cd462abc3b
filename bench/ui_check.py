"""Open a store's MLflow UI as a user would (`mlflow ui` on 127.0.0.1), check through the REST API what it
shows for an skd experiment (the experiment kind, dataset inputs, lineage tags and description, no
registered model nobody asked for: `tests.uikit.ui_problems`), and take screenshots of the experiment page
and of one run's page with headless Chromium (Debian's `chromium` package).

    python bench/ui_check.py --store sqlite:///mlflow.db --experiment skd-demo --screenshots docs/

Prints one JSON line ({"problems": [...], "screenshots": [...]}) and exits 1 when a problem was found.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.driver.runtime import free_port  # noqa: E402
from tests.faultkit import stop  # noqa: E402
from orchestrator.tracking import experiment_url  # noqa: E402
from tests.uikit import rest, start_mlflow_ui, ui_problems  # noqa: E402


def screenshot(url: str, out: Path, width: int = 1600, height: int = 1000) -> None:
    """A PNG of `url` as headless Chromium renders it after up to 20 s of page time (the UI is a React app
    that loads its data after the first paint).

    Raises:
        RuntimeError: no `chromium` on PATH, or it wrote no file.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise RuntimeError("no chromium on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="skd-chromium-") as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        "--virtual-time-budget=20000", f"--screenshot={out}", url],
                       check=False, capture_output=True, timeout=180)
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="MLflow tracking URI, e.g. sqlite:///mlflow.db")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--registered", action="append", default=[], help="A model name that may be registered.")
    parser.add_argument("--screenshots", type=Path, help="Folder for mlflow-experiment.png and mlflow-run.png.")
    parser.add_argument("--run-name", help="The run whose page to photograph (default: the newest distill run).")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="skd-ui-") as tmp:
        ui = start_mlflow_ui(args.store, port, Path(tmp) / "ui.log")
        try:
            base = f"http://127.0.0.1:{port}"
            problems = ui_problems(base, args.experiment, set(args.registered))
            shots = []
            if args.screenshots:
                args.screenshots.mkdir(parents=True, exist_ok=True)
                exp = rest(base, "experiments/get-by-name?experiment_name=" + urllib.parse.quote(args.experiment))
                exp_id = exp["experiment"]["experiment_id"]
                wanted = f" and attributes.run_name = '{args.run_name}'" if args.run_name else ""
                runs = rest(base, "runs/search", {"experiment_ids": [exp_id], "max_results": 1,
                                                  "filter": "tags.`skd.kind` = 'distill'" + wanted,
                                                  "order_by": ["attributes.start_time DESC"]}).get("runs", [])
                pages = {"mlflow-experiment.png": experiment_url(base, exp_id)}
                if runs:
                    pages["mlflow-run.png"] = experiment_url(base, exp_id, runs[0]["info"]["run_id"])
                for name, url in pages.items():
                    screenshot(url, args.screenshots / name)
                    shots.append(str(args.screenshots / name))
        finally:
            stop(ui)
    print(json.dumps({"store": args.store, "experiment": args.experiment, "problems": problems, "screenshots": shots}))
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
