"""The run report (``distillery report``, ``runs/<job>/report.html``): built from a real tiny run through the CLI,
opened in headless Chromium (Debian's ``chromium``), plus its pure pieces and ``distillery init``.

The browser test needs ``chromium``: in CI (the ``CI`` environment variable set, as ``.ci/run`` does, which also
installs it) a missing browser FAILS the test; locally, without ``CI``, it is skipped with a message. The browser
is driven over the DevTools protocol through ``--remote-debugging-pipe`` (NUL-separated JSON on file descriptors
3 and 4: no port, no extra package) and gets no network (every host name resolves to nothing, every request goes
to a proxy that does not exist; the test also fails on any request that is not ``file:`` or ``data:``).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from distillery.cli import main
from distillery.report import SECTIONS, agreement_matrix, build_report, mpl_text, refresh_report, runtime_snippet
from distillery.rundir import RunPaths, read_json, write_json, write_table
from tests.conftest import EUROSAT_CLASSES, SAMPLE

# ---------------------------------------------------------------------------------------------------------------
# A tiny DevTools client over --remote-debugging-pipe

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    env = os.environ.get("DISTILLERY_CHROMIUM")
    if env:
        return shutil.which(env)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, executable: str, profile: Path, timeout: float = 60.0):
        self.timeout = timeout
        self._id = 0
        self._buf = b""
        self.events: list[dict] = []
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The browser reads fd 3 and writes fd 4; move both ends above 10 first so the redirections cannot collide.
        hi_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        for fd in (to_child_r, from_child_w):
            os.close(fd)
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps", "--mute-audio",
                "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                "--allow-file-access-from-files", "--hide-scrollbars", "about:blank"]
        cmd = 'exec "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-'.format(r=hi_r, w=hi_w)
        self.log_path = profile / "chromium.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["bash", "-c", cmd, "chromium", *args], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(hi_r, hi_w))
        os.close(hi_r)
        os.close(hi_w)

    # -- transport
    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time; its log: " + self._log_tail())
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe; its log: " + self._log_tail())
                self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            n = os.write(self._to_child, data)
            data = data[n:]
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str | None = None) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method and (session is None or e.get("sessionId") == session):
                return self.events.pop(i)
        deadline = time.monotonic() + self.timeout
        while True:
            e = self._read_message(deadline)
            if e.get("method") == method and (session is None or e.get("sessionId") == session):
                return e
            self.events.append(e)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


def open_page(executable: str, url: str, profile: Path, screenshot: Path, check_js: str) -> dict:
    """Load ``url`` in a fresh headless tab, evaluate ``check_js`` (an expression giving a JSON-able value) after
    the load event, save a full-page PNG to ``screenshot``; returns the value, the console errors and exceptions,
    and every request that was not ``file:`` or ``data:``."""
    b = Browser(executable, profile)
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.send(f"{domain}.enable", session=session)
        b.send("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 1000, "deviceScaleFactor": 1,
                                                       "mobile": False}, session=session)
        nav = b.send("Page.navigate", {"url": url}, session=session)
        if nav.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {nav['errorText']}")
        b.wait_event("Page.loadEventFired", session)
        # let images decode
        decode_all = "Promise.all([...document.images].map(i => i.decode().catch(() => null)))"
        b.send("Runtime.evaluate", {"expression": decode_all, "awaitPromise": True}, session=session)
        value = b.send("Runtime.evaluate", {"expression": check_js, "returnByValue": True}, session=session)
        if "exceptionDetails" in value:
            raise RuntimeError(f"check script failed: {value['exceptionDetails']}")
        metrics = b.send("Page.getLayoutMetrics", session=session)
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        shot = b.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}}, session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        # drain what arrived meanwhile
        b.send("Runtime.evaluate", {"expression": "1"}, session=session)
        errors, requests = [], []
        for e in b.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
            elif m == "Network.requestWillBeSent":
                u = p.get("request", {}).get("url", "")
                if not (u.startswith("file:") or u.startswith("data:")):
                    requests.append(u)
        return {"value": value["result"].get("value"), "errors": errors, "requests": requests,
                "size": (size["width"], size["height"])}
    finally:
        b.close()


def _chromium_or_fail_or_skip() -> str:
    exe = find_chromium()
    if exe:
        return exe
    msg = ("chromium is not installed: the report test opens report.html in Debian's headless chromium "
           "(`apt-get install -y chromium`; .ci/run installs it). Set DISTILLERY_CHROMIUM to another binary.")
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg + " Skipped because CI is unset; in CI this fails.")


# ---------------------------------------------------------------------------------------------------------------
# The run


def _eval_dir(tmp_path: Path, folders: list[str]) -> Path:
    d = tmp_path / "eval"
    for f in folders:
        shutil.copytree(SAMPLE / "eval" / f, d / f)
    return d


def _write_job(tmp_path: Path, tiny_models, unlabeled: Path) -> Path:
    classes = [{"name": n, "folder": f} for n, f in EUROSAT_CLASSES[:3]]
    raw = {
        "name": "report-e2e",
        "domain": "satellite photo",
        "classes": classes,
        "data": {"unlabeled": str(unlabeled), "eval": str(_eval_dir(tmp_path, [c["folder"] for c in classes]))},
        "run_dir": str(tmp_path / "run"),
        "models": {k: str(v) for k, v in tiny_models.items()},
        "teacher": {"synth": {"tricks": ["base", "class_prompt", "multi_domain", "random_guidance"],
                              "images_per_class": 2, "steps": 2, "resolution": 64, "output_size": 32,
                              "batch_size": 8},
                    "lora": {"steps": 3, "batch_size": 2},
                    "air": {"k": 2, "epochs": 1},
                    "latte": {"enabled": True, "epochs": 1, "batch_size": 16, "max_new_tokens": 4,
                              "use_group_descriptions": False},
                    "vermouth": {"resolution": 64, "head_width": 16, "epochs": 1, "batch_size": 8}},
        "student": {"model": "mobilenetv3_small_050", "input_size": 32, "epochs": 2, "batch_size": 8},
        "export": {"formats": ["fp32", "fp16", "int8"], "required": ["fp32"], "parity_images": 8,
                   "calibration_images": 8, "int8_qat_epochs": 1, "int8_qat_images": 8, "deploy_timing_s": 0.05},
    }
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


CHECK_JS = r"""(() => {
  const imgs = [...document.images].map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight,
                                              complete: i.complete, data: i.src.startsWith('data:image/png;base64,')}));
  const sections = [...document.querySelectorAll('section.stage')].map(s => s.id);
  const prov = [...document.querySelectorAll('figcaption .prov')].map(p => p.textContent);
  const headings = [...document.querySelectorAll('section.stage h3')].map(h => h.textContent);
  return {title: document.title, imgs, sections, prov, headings, scripts: document.scripts.length,
          code: (document.querySelector('#export pre') || {}).textContent || ''};
})()"""


def test_report_end_to_end_in_headless_chromium(tmp_path, tiny_models, small_unlabeled, capsys):
    exe = _chromium_or_fail_or_skip()
    (small_unlabeled / "broken.jpg").write_bytes(b"not a jpeg")  # a skipped input, listed with its reason
    job = _write_job(tmp_path, tiny_models, small_unlabeled)
    paths = RunPaths(tmp_path / "run")

    assert main(["teacher", "--job", str(job), "--no-progress"]) == 0
    html = paths.report_html.read_text()
    assert 'id="synthesis"' in html and 'id="teachers"' in html and 'id="student"' not in html
    assert "student: not run yet" in html
    for stage in ("student", "export"):
        assert main([stage, "--job", str(job), "--no-progress"]) == 0
        assert f'id="{stage}"' in paths.report_html.read_text()
    metrics = read_json(paths.student_metrics)
    assert all(h["eval_top1"] is not None for h in metrics["history"])  # the accuracy curve's points

    capsys.readouterr()
    assert main(["report", "--job", str(job)]) == 0
    assert capsys.readouterr().out.strip() == str(paths.report_html)
    before, reused = paths.report_html.stat().st_mtime_ns, paths.report_html.read_bytes()
    assert main(["report", "--job", str(job)]) == 0
    assert paths.report_html.stat().st_mtime_ns == before  # an unchanged run folder leaves the page untouched
    from distillery.job import load_job

    t0 = time.perf_counter()
    build_report(load_job(job), reuse=False)  # every section drawn afresh gives the same bytes as the reused ones
    build_s = time.perf_counter() - t0
    assert paths.report_html.read_bytes() == reused

    shot = tmp_path / "report.png"
    got = open_page(exe, paths.report_html.resolve().as_uri(), _profile(tmp_path), shot, CHECK_JS)
    artifacts = os.environ.get("DISTILLERY_TEST_ARTIFACTS")  # CI may collect the screenshot from there
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, Path(artifacts) / "report.png"))
    with capsys.disabled():  # shown even without -s
        print(f"\nreport {paths.report_html} ({paths.report_html.stat().st_size / 1e6:.1f} MB, built afresh in "
              f"{build_s:.1f} s); full-page screenshot {shot} ({got['size'][0]:.0f}x{got['size'][1]:.0f} px)")
    v = got["value"]
    assert got["errors"] == [], got["errors"]
    assert got["requests"] == [], f"the page asked the network for {got['requests']}"
    assert v["sections"] == list(SECTIONS)
    assert v["scripts"] == 0
    for h in ("The ladder", "Ensemble weights", "Skipped inputs", "Images per class and trick",
              "Per-class accuracy on data.eval"):
        assert any(x.startswith(h) for x in v["headings"]), (h, v["headings"])
    assert any(x.startswith("Top-1 on data.eval") for x in v["headings"])
    alts = [i["alt"] for i in v["imgs"]]
    expected = ["Domain LoRA: training loss per step", *[f"Trick {t}: a row per class" for t in
                                                         ("base", "class_prompt", "multi_domain", "random_guidance")],
                "Class histogram per column", "Confidence histogram per column", "Agreement matrix between columns",
                "AiR prototypes: the synthetic images closest to their class mean", "Confusion matrix on data.eval"]
    for e in expected:
        assert e in alts, (e, alts)
    assert any(a.startswith("Per epoch: loss, throughput, accuracy") for a in alts)
    bad = [i for i in v["imgs"] if not (i["complete"] and i["w"] > 0 and i["h"] > 0 and i["data"])]
    assert not bad, f"images not decoded or not embedded: {bad}"
    # every figure names the job, its stage and a settings hash
    assert len(v["prov"]) == len(v["imgs"])
    for p in v["prov"]:
        assert re.fullmatch(r"job report-e2e · stage \S+ · settings [0-9a-f]{12}", p), p
    assert "from distillery.runtime import Classifier" in v["code"] and "Classifier.load(" in v["code"]
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert got["size"][1] > 2000  # the full page, not one viewport


def _profile(tmp_path: Path) -> Path:
    p = tmp_path / "chromium-profile"
    p.mkdir()
    return p


# ---------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_agreement_matrix_counts_matching_argmax():
    a = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])  # argmax 0 1 0 1
    b = np.array([[0.7, 0.3], [0.1, 0.9], [0.4, 0.6], [0.5, 0.5]])  # argmax 0 1 1 0 (a tie goes to the first)
    c = 1 - a                                                        # argmax 1 0 1 0
    names, m = agreement_matrix({"a": a, "b": b, "c": c})
    assert names == ["a", "b", "c"]
    assert m.tolist() == [[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]]


def test_mpl_text_and_runtime_snippet(tmp_path):
    assert mpl_text("$5 bill") == r"\$5 bill"
    code = runtime_snippet(tmp_path / "runs" / "j" / "export", cwd=tmp_path)
    assert code.splitlines()[0] == "from distillery.runtime import Classifier"
    assert "Classifier.load('runs/j/export')" in code and len(code.splitlines()) == 3


def _hostile_run(tmp_path, make_job):
    names = ["<script>alert(1)</script>", "a & b $x$", 'quote " \' <b>']
    job = make_job({"name": "<i>job"}, classes=[{"name": n} for n in names])
    paths = RunPaths(job.run_path)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=12)
    write_table(paths.pseudo_labels, {"path": [f"/x/{i}.jpg" for i in range(12)], "p_clip": p.tolist(),
                                      "soft_target": p[::-1].tolist()})
    write_table(paths.images_index, {"path": ["/x/<img src=x onerror=alert(1)>.jpg", "/x/0.jpg"],
                                     "sha256": [None, "0" * 64], "skipped": ["cannot be read (<b>bad</b>)", None]})
    write_json(paths.teacher / ".ensemble.stamp.json", {"key": "ab" * 32, "weights": {"clip": 1.0},
                                                        "weights_why": "<em>fixed</em>"})
    return job, names


def test_report_escapes_class_names_and_paths(tmp_path, make_job):
    job, names = _hostile_run(tmp_path, make_job)
    html = build_report(job).read_text()
    assert "<script" not in html and "<img src=x" not in html and "<b>bad" not in html and "<em>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a &amp; b $x$" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;i&gt;job" in html
    assert 'id="teachers"' in html and 'id="student"' not in html


def test_hostile_report_shows_text_in_chromium(tmp_path, make_job):
    exe = _chromium_or_fail_or_skip()
    job, names = _hostile_run(tmp_path, make_job)
    page = build_report(job)
    got = open_page(exe, page.resolve().as_uri(), _profile(tmp_path), tmp_path / "hostile.png",
                    "({text: document.body.innerText, scripts: document.scripts.length})")
    assert got["errors"] == [] and got["value"]["scripts"] == 0
    assert names[0] in got["value"]["text"]  # shown as text, never run


def test_a_failing_report_never_fails_the_stage(tmp_path, make_job, capsys):
    job = make_job()
    paths = RunPaths(job.run_path)
    paths.teacher.mkdir(parents=True)
    paths.pseudo_labels.write_bytes(b"not parquet")
    assert refresh_report(job) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[distillery] report: not refreshed")


# ---------------------------------------------------------------------------------------------------------------
# distillery init


def test_init_writes_a_job_that_loads_from_anywhere(tmp_path, tiny_models, monkeypatch):
    from distillery.job import load_job

    tiny_folder = Path(next(iter(tiny_models.values()))).parent
    out = tmp_path / "elsewhere" / "my-job.yaml"
    ev = _eval_dir(tmp_path, ["Forest", "River", "SeaLake"])
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--classes", "forest,river,sea or lake=SeaLake", "--unlabeled", str(SAMPLE / "unlabeled"),
                 "--eval", "eval", "--domain", "satellite photo", "--out", str(out),
                 "--tiny-models", str(tiny_folder)]) == 0
    text = out.read_text()
    assert text.startswith("# distillery job my-job") and "\n# " in text
    monkeypatch.chdir(SAMPLE)  # any folder: every path in it is absolute
    job = load_job(out)
    assert job.name == "my-job" and job.class_names == ["forest", "river", "sea or lake"]
    assert [c.folder for c in job.classes] == ["Forest", "River", "SeaLake"]
    assert job.domain == "satellite photo" and job.data.eval == str(ev.resolve())
    assert job.models.clip == str((tiny_folder / "clip").resolve()) and Path(job.models.clip).is_absolute()
    assert job.export.formats == ["fp32", "fp16", "int8"] and len(job.teacher.synth.tricks) == 4
    # init writes run_dir: the run folder sits beside the job file whatever folder a stage is run from
    assert job.run_path == (out.parent / "runs" / "my-job").resolve()

    real = tmp_path / "real.yaml"
    assert main(["init", "--classes", "cat,dog", "--unlabeled", str(SAMPLE / "unlabeled"), "--real",
                 "--out", str(real)]) == 0
    rj = load_job(real)
    assert rj.models.diffusion == "stable-diffusion-v1-5/stable-diffusion-v1-5" and rj.data.eval is None
    assert rj.domain is None


@pytest.mark.parametrize("args, needle", [
    (["--classes", "forest,lake"], "no folder of"),
    (["--classes", "forest=Nope,river"], "folder 'Nope'"),
    (["--classes", "forest,river"], "match no class"),
    (["--classes", "forest"], "at least 2 classes"),
])
def test_init_errors_name_the_fix(tmp_path, args, needle, capsys):
    rc = main(["init", *args, "--unlabeled", str(SAMPLE / "unlabeled"), "--eval", str(SAMPLE / "eval"),
               "--out", str(tmp_path / "j.yaml"), "--real"])
    assert rc == 2 and needle in capsys.readouterr().err
