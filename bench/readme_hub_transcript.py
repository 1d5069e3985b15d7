"""The README's Hub transcript, regenerated against the test suite's Hub stand-in (127.0.0.1, no network).

    python bench/readme_hub_transcript.py

prints each command and its output (the `patchlab` on PATH), then the start of the pushed model card.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "fixtures" / "models"
REPO = "acme/tiny-llama"


def main() -> None:
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_TOKEN="hf_standin_token")
    os.environ.pop("HF_HUB_OFFLINE", None)
    sys.path.insert(0, str(ROOT))
    from patchlab.io import hub as hub_io  # after the environment: huggingface_hub reads it at import
    from tests.hub_standin import HubStandin

    hub = HubStandin().start()
    work = Path(tempfile.mkdtemp(prefix="hub-transcript-"))
    os.environ.update(HF_ENDPOINT=hub.url, HF_HOME=str(work / "hf"), COLUMNS="200")
    pl = shutil.which("patchlab") or "patchlab"

    def sh(cmd: str, show: bool = True, home: str = "reg") -> None:
        env = dict(os.environ, PATCHLAB_HOME=str(work / home))
        r = subprocess.run(f"{pl} {cmd}", shell=True, capture_output=True, text=True, env=env, cwd=work)
        if show:
            print(f"$ patchlab {cmd}")
            print((r.stdout + r.stderr).rstrip())

    try:
        hub_io.push_folder(MODELS / "v1", REPO, commit_message="v1", endpoint=hub.url)
        hub_io.push_folder(MODELS / "v2", REPO, commit_message="v2", revision="v2", endpoint=hub.url)
        hub_io._api(hub.url, None).create_tag(REPO, tag="v2", revision=hub.head(REPO, "v2"))
        sh("init", False)
        sh("init", False, home="other")
        sh(f"base add llama@v1 {REPO}")
        sh(f"base add llama@v2 {REPO} --revision v2 --no-download")
        sh(f"diff llama@v1 {MODELS / 'ft-v1'} task.patch --name task", False)
        sh("port task llama@v2 task-on-v2", False)
        sh("diff llama@v2 task-on-v2 task-v2.patch --name task --parent task@1", False)
        sh("push task@2 acme/tiny-llama-task")
        sh("push task@2 acme/tiny-llama-task")
        sh("pull acme/tiny-llama-task", home="other")
        sh(f"base add llama@v2 {REPO} --revision v2", home="other")
        sh("pull acme/tiny-llama-task", home="other")
        print("---- model card")
        print(hub.files("acme/tiny-llama-task")["README.md"].decode()[:1500])
    finally:
        hub.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
