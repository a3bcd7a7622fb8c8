"""`frugalseg query` and `frugalseg annotate`: queries from a trained run, answers merged into partial masks,
and the page driven end to end in a real headless browser."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from frugalseg.cli import cli
from frugalseg.data.io import read_label_png
from frugalseg.errors import DataError
from frugalseg.stages.annotate import AnnotationSession, make_server
from tests.cli_run import run_main


@pytest.fixture(scope="module")
def partly_labelled(shapes_dataset, tmp_path_factory) -> Path:
    """The shapes dataset with masks for only 4 of its 12 training images."""
    root = tmp_path_factory.mktemp("partly") / "shapes"
    shutil.copytree(shapes_dataset, root)
    for stem in (root / "splits" / "train.txt").read_text().split()[4:]:
        (root / "masks" / f"{stem}.png").unlink()
    return root


@pytest.fixture(scope="module")
def queried(shapes_dataset, partly_labelled, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("qrun") / "tiny"
    res = CliRunner().invoke(cli, ["train", "--data", str(shapes_dataset), "--out", str(run), "--arch", "fcn",
                                   "--pretrained", "false", "--epochs", "1", "--batch-size", "4", "--crop-size", "64",
                                   "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["query", str(run), "--data", str(partly_labelled), "--regions", "6",
                                   "--n-segments", "40"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "6 queries from 12 images" in res.output and "frugalseg annotate" in res.output
    return run / "queries"


def test_queries_file_and_page(queried, partly_labelled):
    doc = json.loads((queried / "queries.json").read_text())
    assert doc["strategy"] == "geometry" and doc["classes"] == ["background", "disc", "square", "triangle"]
    assert doc["masks"] == str((partly_labelled / "masks").resolve())  # a folders dataset: its own masks/
    qs = doc["queries"]
    assert len(qs) == 6 and [q["id"] for q in qs] == [f"q{k:03d}" for k in range(6)]
    assert all(a["score"] >= b["score"] for a, b in zip(qs, qs[1:]))  # best first
    labelled = set((partly_labelled / "splits" / "train.txt").read_text().split()[:4])
    for q in qs:
        regions = np.load(queried / q["regions_file"])["regions"]
        region = regions == q["region"]
        assert region.sum() == q["pixels"] > 0
        y0, x0, y1, x1 = q["bbox"]
        assert region[y0:y1, x0:x1].sum() == q["pixels"]
        assert q["why"].startswith("combined uncertainty") and "predicted" in q["why"]
        assert q["sample"] not in labelled  # fully annotated regions are never asked
    page = (queried / "queries.html").read_text()
    assert page.count("<figure>") == 6 and "frugalseg annotate" in page


def test_answers_merge_into_partial_masks(queried, tmp_path):
    session = AnnotationSession(queried, masks=tmp_path / "answers")
    q = session.doc["queries"][0]
    task = session.task(q["id"])
    region = np.array(task["region"], bool).reshape(task["height"], task["width"])
    painted = np.zeros(task["height"] * task["width"], int)
    painted[region.ravel()] = 2
    out = session.answer(q["id"], painted.tolist())
    mask = read_label_png(Path(out["mask"]))
    full = np.load(queried / q["regions_file"])["regions"] == q["region"]
    assert (mask[full] == 2).all() and (mask[~full] == 255).all()  # void outside the answered region
    assert out["pixels"] == {"square": int(full.sum())}
    assert json.loads((queried / "answers.json").read_text())[q["id"]]["sample"] == q["sample"]
    with pytest.raises(DataError, match="unknown class ids \\[7\\]"):
        session.answer(q["id"], [7] * len(painted))
    with pytest.raises(DataError, match="labels for a"):
        session.answer(q["id"], [0, 1])
    (queried / "answers.json").unlink()
    with pytest.raises(DataError, match="no queries.json"):
        AnnotationSession(tmp_path)


def test_query_errors(queried, shapes_dataset, monkeypatch):
    run = queried.parent
    code, _, err = run_main(["query", str(run), "--data", str(shapes_dataset)], monkeypatch)
    assert code == 2 and "every region is already annotated" in err and "Traceback" not in err
    code, _, err = run_main(["query", str(shapes_dataset)], monkeypatch)
    assert code == 2 and "no config.yaml" in err


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e .[test])")
    if not shutil.which("chromedriver") or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make browser)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


def test_annotate_page_in_a_headless_browser(queried, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    session = AnnotationSession(queried, masks=tmp_path / "masks")
    server = make_server(session, port=0)
    assert server.server_address[0] == "127.0.0.1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = _browser()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait = WebDriverWait(driver, 20)
        wait.until(ec.presence_of_element_located((By.ID, "query-q000")))
        wait.until(lambda d: d.execute_script("return task !== null && image !== null && image.complete"))
        first = driver.execute_script("return current.id")
        driver.find_element(By.CSS_SELECTOR, ".class-btn[data-class='3']").click()  # triangle
        driver.find_element(By.ID, "fill").click()
        driver.find_element(By.ID, "save").click()
        wait.until(lambda d: "done" in d.execute_script(f"return document.getElementById('query-{first}').className"))
        wait.until(lambda d: d.execute_script("return current.id") != first)  # moved on to the next query
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    q = session.query(first)
    mask = np.array(Image.open(tmp_path / "masks" / f"{Path(q['image']).stem}.png"))
    region = np.load(queried / q["regions_file"])["regions"] == q["region"]
    assert (mask[region] == 3).all() and (mask[~region] == 255).all()
    assert json.loads((queried / "answers.json").read_text())[first]["pixels"] == {"triangle": int(region.sum())}
    assert Path(q["image"]).stem in (queried / "labelled_ids.txt").read_text().split()


def test_plane_queries_of_a_volume_and_their_answers(tmp_path):
    """Volumes: the best planar patches (no supervoxel twice), each resampled as a slice; an answer painted
    on the slice lands in the nearest voxels of a NIfTI partial mask, void elsewhere."""
    import torch

    from frugalseg.data.labels import LabelSpec
    from frugalseg.data.nifti import write_nifti
    from frugalseg.data.samples import Sample, SegDataset
    from frugalseg.stages.annotate import read_volume_mask
    from frugalseg.stages.query import QueryConfig, _query_volumes

    rng = np.random.default_rng(0)
    vol = (rng.normal(size=(10, 32, 32)) * 0.05).astype(np.float32)
    vol[3:7, 8:24, 8:24] += 1.0
    write_nifti(tmp_path / "case.nii.gz", vol, (2.0, 1.0, 1.0))
    labels = LabelSpec(names=("background", "organ"))
    ds = SegDataset(name="toy", samples=[Sample(id="case", image=tmp_path / "case.nii.gz", spacing=(2.0, 1.0, 1.0))],
                    labels=labels, ndim=3)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1)).eval()
    out = tmp_path / "queries"
    cfg = QueryConfig(run=str(tmp_path), planes=2, supervoxels=60, plane_r=2.0, plane_radius=10.0)

    class RunCfg:
        data = "toy"

    res = _query_volumes(cfg, tmp_path, RunCfg, ds, ds.samples, model, {"dims": 2, "in_chans": 1}, labels, out,
                         "cpu", 0.0)
    assert res["queries"] == 2
    doc = json.loads((out / "queries.json").read_text())
    q = doc["queries"][0]
    assert q["kind"] == "plane" and abs(np.linalg.norm(q["normal"]) - 1) < 1e-4 and q["volume_shape"] == [10, 32, 32]
    assert doc["queries"][0]["score"] >= doc["queries"][1]["score"] and "<figure>" in (out / "queries.html").read_text()
    session = AnnotationSession(out)
    task = session.task(q["id"])
    patch = np.array(task["region"], bool)
    assert patch.sum() == q["pixels"] > 0 and len(task["start"]) == task["width"] * task["height"]
    assert session.crop_png(q["id"]).startswith(b"\x89PNG")
    painted = np.where(patch, 1, 0)
    result = session.answer(q["id"], painted.tolist())
    mask = read_volume_mask(Path(result["mask"]))
    assert mask.shape == (10, 32, 32)
    assert (mask == 1).sum() == result["voxels"] > 0 and set(np.unique(mask)) == {1, 255}
    assert session.task(q["id"])["start"] == np.where(patch, 1, task["start"]).tolist()  # the saved answer returns


def test_only_this_page_may_write(queried, tmp_path):
    import urllib.error
    import urllib.request

    server = make_server(AnnotationSession(queried, masks=tmp_path / "m"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        def post(headers: dict) -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/answer/q000", data=b'{"labels": []}',
                                         headers=headers, method="POST")
            try:
                return urllib.request.urlopen(req).status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert post({"Content-Type": "application/json", "Origin": "http://evil.example"}) == 403
        assert post({"Content-Type": "text/plain"}) == 403  # a cross-site form post
        assert post({"Content-Type": "application/json"}) == 400  # ours, but an empty answer
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "m").exists()


def test_answered_regions_are_not_asked_again(queried, partly_labelled, tmp_path):
    first = json.loads((queried / "queries.json").read_text())["queries"][0]
    session = AnnotationSession(queried)  # the folders dataset's own masks/
    task = session.task(first["id"])
    session.answer(first["id"], [1] * (task["width"] * task["height"]))
    assert (partly_labelled / "masks" / f"{first['sample']}.png").exists()
    res = CliRunner().invoke(cli, ["query", str(queried.parent), "--data", str(partly_labelled), "--regions", "6",
                                   "--n-segments", "40", "--out", str(tmp_path / "again")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "queries.json").read_text())["queries"]
    assert (first["sample"], first["region"]) not in {(q["sample"], q["region"]) for q in again}


def test_multiclass_criterion_and_a_bad_one(queried, partly_labelled, tmp_path, monkeypatch):
    res = CliRunner().invoke(cli, ["query", str(queried.parent), "--data", str(partly_labelled), "--regions", "3",
                                   "--n-segments", "40", "--criterion", "conditional_entropy", "--out",
                                   str(tmp_path / "ce")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "ce" / "queries.json").read_text())["queries"]) == 3
    code, _, err = run_main(["query", str(queried.parent), "--criterion", "bald"], monkeypatch)
    assert code == 2 and "criterion" in err and "conditional_entropy" in err
