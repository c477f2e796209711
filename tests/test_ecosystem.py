"""insightface's formats and protocols, with small files written here in exactly those formats:
verification .bin sets and their 10-fold accuracy, face alignment, the IJB-B/C protocol, IResNet
state dicts, and ONNX export."""
import csv
import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gif_kernels.train import checkpoint
from gif_kernels.train.backbones import build_backbone, load_backbone_weights
from gif_kernels.train.data import UnsafePickleError, load_val_sets, read_bin, write_bin
from gif_kernels.train.data.align import ARCFACE_LANDMARKS, align_face, similarity_transform, warp_affine
from gif_kernels.train.data.ijb import read_ijb, template_features
from gif_kernels.train.data.valsets import val_set_path
from gif_kernels.train.evaluate import VAL_THRESHOLDS, ten_fold_accuracy
from gif_kernels.train.evaluate_ijb import IJB_FARS, tar_at_far
from gif_kernels.train.trainer import parse_run, train
from tests.helpers.trainer_runs import TINY, environment

SIZE = 16  # TINY's --image-size


def random_images(count, size=SIZE, seed=0):
    return [np.random.default_rng(seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(count)]


def run_tool(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=environment(), capture_output=True,
                          text=True, timeout=600)


# --- verification .bin sets -------------------------------------------------------------------------

def test_bin_round_trip(tmp_path):
    images, is_same = random_images(6), [True, False, True]
    write_bin(tmp_path / "lfw.bin", images, is_same)
    pixels, flags = read_bin(tmp_path / "lfw.bin", SIZE)
    assert pixels.dtype == torch.uint8 and pixels.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(pixels, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))  # PNG is lossless
    assert flags.tolist() == is_same


def encoded(images):
    out = []
    for image in images:
        buffer = io.BytesIO()
        from PIL import Image
        Image.fromarray(image).save(buffer, format="png")
        out.append(buffer.getvalue())
    return out


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_bin_as_older_writers_made_them(tmp_path, protocol):
    # Protocol 2 pickles bytes through _codecs.encode; the flags as a numpy bool array, as some sets have them.
    images = random_images(4)
    (tmp_path / "old.bin").write_bytes(pickle.dumps((encoded(images), np.array([False, True])), protocol=protocol))
    pixels, flags = read_bin(tmp_path / "old.bin", SIZE)
    assert flags.tolist() == [False, True] and pixels.shape == (4, 3, SIZE, SIZE)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_bin_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_RunsCode(marker)], [True])))
    with pytest.raises(UnsafePickleError, match=r"refuses to load the global (io|builtins)\.open"):
        read_bin(tmp_path / "evil.bin")
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [
    (pickle.dumps(({"a": 1}, [True]))[:-5], "not a readable verification .bin"),
    (pickle.dumps({"images": []}), "expected a pickled"),
    (pickle.dumps(([b"x"] * 3, [True])), "expected 2 images per is_same flag"),
    (pickle.dumps(([1, 2], [True])), "image 0 is int"),
    (pickle.dumps(([b"not an image"] * 2, [True])), "cannot decode image 0"),
    (pickle.dumps(([b"x"] * 2, [2])), "is_same must be a flat list of booleans"),
])
def test_damaged_bins_raise_naming_the_set(tmp_path, content, message):
    (tmp_path / "bad.bin").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_bin(tmp_path / "bad.bin")


def test_val_targets_are_found_beside_the_data(tmp_path):
    assert val_set_path("lfw", f"recordio:{tmp_path}") == str(tmp_path / "lfw.bin")
    assert val_set_path("lfw", f"recordio:{tmp_path / 'train.rec'}") == str(tmp_path / "lfw.bin")
    assert val_set_path("/sets/agedb_30.bin", "synthetic") == "/sets/agedb_30.bin"
    with pytest.raises(ValueError, match="give the path of its .bin"):
        val_set_path("lfw", "synthetic")
    with pytest.raises(FileNotFoundError, match="lfw.bin not found"):
        load_val_sets(["lfw"], f"imagefolder:{tmp_path}", SIZE)


def counted_accuracy(distance, is_same, folds=10):
    """insightface's calculate_roc accuracy, counted pair by pair."""
    n, result = len(is_same), []
    bounds = [0]
    for k in range(folds):
        bounds.append(bounds[-1] + n // folds + (k < n % folds))
    for k in range(folds):
        test = set(range(bounds[k], bounds[k + 1]))
        best, best_accuracy = None, -1
        for threshold in VAL_THRESHOLDS:
            right = sum((distance[i] < threshold) == is_same[i] for i in range(n) if i not in test)
            if right / (n - len(test)) > best_accuracy:
                best, best_accuracy = threshold, right / (n - len(test))
        result.append(sum((distance[i] < best) == is_same[i] for i in test) / len(test))
    return np.mean(result), np.std(result)


def test_ten_fold_accuracy_against_a_count():
    generator = torch.Generator().manual_seed(0)
    pairs = 57  # folds of 6 and 5
    is_same = (torch.rand(pairs, generator=generator) < 0.5).numpy()
    first = F.normalize(torch.randn(pairs, 8, generator=generator), dim=1)
    second = F.normalize(first + torch.randn(pairs, 8, generator=generator) * torch.where(
        torch.from_numpy(is_same), 0.6, 3.0)[:, None], dim=1)
    embeddings = torch.stack([first, second], 1).reshape(2 * pairs, 8) * 3  # norms do not matter
    distance = ((first.double() - second.double()) ** 2).sum(1).numpy()
    mean, std = ten_fold_accuracy(embeddings, is_same)
    assert (mean, std) == pytest.approx(counted_accuracy(distance, is_same))
    assert 0.6 < mean < 1  # neither trivial nor perfect
    assert ten_fold_accuracy(torch.cat([first, first]).reshape(2, pairs, 8).transpose(0, 1).reshape(-1, 8),
                             np.ones(pairs, bool)) == (1.0, 0.0)
    with pytest.raises(ValueError, match="cannot make 10 folds"):
        ten_fold_accuracy(embeddings[:18], is_same[:9])


def test_trainer_scores_val_targets_during_and_after(tmp_path):
    write_bin(tmp_path / "lfw.bin", random_images(24), [k % 2 == 0 for k in range(12)])
    out = tmp_path / "run"
    metrics = train(parse_run([*TINY, "--val-targets", str(tmp_path / "lfw.bin"), "--val-every", "3",
                               "--out", str(out)]))
    assert 0 <= metrics["lfw_accuracy"] <= 1 and metrics["lfw_accuracy_std"] >= 0
    with open(out / "log.csv", newline="") as file:
        rows = {int(row["step"]): row for row in csv.DictReader(file)}
    assert [step for step, row in rows.items() if row["lfw_accuracy"]] == [3, 6]
    assert rows[6]["loss"] and rows[3]["loss"]  # one row per step: the scores beside the loss
    again = run_tool("gif_kernels.train.evaluate", out, "--out", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["lfw_accuracy"] == \
        pytest.approx(metrics["lfw_accuracy"])


def test_trainer_val_target_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="give the path of its .bin"):
        train(parse_run([*TINY, "--val-targets", "lfw", "--out", str(tmp_path / "a")]))
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as exit_info:
        parse_run(["--data", "features:x.npz", "--val-targets", "lfw", "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 2 and "--val-targets: features data" in capsys.readouterr().err


# --- alignment --------------------------------------------------------------------------------------

def test_similarity_transform_recovers_a_known_one():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -2.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    source = np.random.default_rng(0).normal(size=(5, 2)) * 20
    matrix = similarity_transform(source, source @ (scale * rotation).T + shift)
    assert np.allclose(matrix[:, :2], scale * rotation) and np.allclose(matrix[:, 2], shift)
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(np.ones((5, 2)), source)


def bilinear(image, x, y):
    """image (C, H, W) at (x, y), pixel centres at integers, 0 outside."""
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    value = np.zeros(image.shape[0])
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < image.shape[2] and 0 <= yi < image.shape[1]:
                value += (1 - abs(x - xi)) * (1 - abs(y - yi)) * image[:, yi, xi]
    return value


def test_warp_affine_against_pointwise_bilinear_samples():
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 23, 31), dtype=np.uint8))
    matrix = np.array([[0.8, -0.3, 4.0], [0.25, 0.9, -3.0]])
    warped = warp_affine(image, matrix, 20)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
    for y in range(20):
        for x in range(20):
            source_x, source_y, _ = inverse @ [x, y, 1]
            expected = np.clip(np.round(bilinear(image.double().numpy(), source_x, source_y)), 0, 255)
            assert np.abs(warped[:, y, x].numpy() - expected).max() <= 1, (x, y)


def test_align_face_puts_the_landmarks_on_the_template():
    # An image whose marks sit where a similarity transform of the template puts them.
    image = np.zeros((3, 150, 130), np.uint8)
    matrix = np.array([[1.1, 0.2, 10.0], [-0.2, 1.1, 20.0]])
    marks = ARCFACE_LANDMARKS @ matrix[:, :2].T + matrix[:, 2]
    for x, y in np.round(marks).astype(int):
        image[:, y - 1:y + 2, x - 1:x + 2] = 255
    aligned = align_face(torch.from_numpy(image), marks)
    assert aligned.shape == (3, 112, 112)
    for x, y in np.round(ARCFACE_LANDMARKS).astype(int):
        assert aligned[0, y - 1:y + 2, x - 1:x + 2].float().mean() > 100


# --- IJB-B / IJB-C ----------------------------------------------------------------------------------

def write_ijb(root, target="ijbc"):
    """A small IJB folder: 5 templates of 2-4 images, some from one media, 8 pairs."""
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    from PIL import Image
    generator = np.random.default_rng(2)
    members = [(1, 10), (1, 10), (1, 11), (2, 20), (2, 21), (3, 30), (3, 30), (3, 30), (3, 31), (7, 70), (7, 71),
               (9, 90), (9, 90)]
    faces, meta = [], []
    for index, (template, media) in enumerate(members):
        name = f"{index}.jpg"
        Image.fromarray(generator.integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(root / "loose_crop" / name)
        marks = ARCFACE_LANDMARKS * 0.4 + generator.normal(0, 1, (5, 2)) + 3
        faces.append(" ".join([name, *(f"{v:.3f}" for v in marks.reshape(-1)), f"{generator.uniform(0.5, 1):.4f}"]))
        meta.append(f"{name} {template} {media}")
    (root / "meta" / f"{target}_name_5pts_score.txt").write_text("\n".join(faces) + "\n")
    (root / "meta" / f"{target}_face_tid_mid.txt").write_text("\n".join(meta) + "\n")
    pairs = [(1, 2, 1), (1, 3, 0), (2, 3, 0), (3, 7, 1), (7, 9, 0), (1, 9, 1), (2, 7, 0), (3, 9, 0)]
    (root / "meta" / f"{target}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in pairs))
    return members, pairs


def pooled_by_loops(features, members):
    """insightface's image2template_feature, a loop over templates and media."""
    pooled = {}
    for template in sorted({t for t, _ in members}):
        total = 0
        for media in sorted({m for t, m in members if t == template}):
            rows = [i for i, (t, m) in enumerate(members) if t == template and m == media]
            total = total + features[rows].mean(0)
        pooled[template] = total / np.linalg.norm(total)
    return pooled


def test_template_pooling_against_loops():
    members = [(5, 1), (5, 1), (5, 2), (3, 4), (8, 6), (8, 6), (8, 7), (8, 7), (8, 7)]
    features = np.random.default_rng(3).normal(size=(len(members), 6))
    pooled, ids = template_features(torch.from_numpy(features), np.array([t for t, _ in members]),
                                    np.array([m for _, m in members]))
    expected = pooled_by_loops(features, members)
    assert ids.tolist() == sorted(expected)
    for row, template in enumerate(ids):
        assert np.allclose(pooled[row].numpy(), expected[template])


def test_tar_at_far_takes_the_nearest_far_and_the_highest_tar_there():
    is_same = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.85, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    from sklearn.metrics import roc_curve
    table = tar_at_far(*roc_curve(is_same, scores)[:2], fars=(1e-6, 0.1, 0.2))
    # ROC points (FAR, TAR): (0, 0), (0, 1/3), (1/9, 1/3), (1/9, 2/3), (1/9, 1), (2/9, 1), (1, 1)
    assert table == {1e-6: pytest.approx(1 / 3), 0.1: 1.0, 0.2: 1.0}


def test_ijb_protocol_end_to_end(tmp_path):
    members, pairs = write_ijb(tmp_path / "IJBC")
    train(parse_run([*TINY, "--out", str(tmp_path / "run")]))
    result = run_tool("gif_kernels.train.evaluate_ijb", "--root", tmp_path / "IJBC", "--target", "IJBC",
                      tmp_path / "run", "--out", tmp_path / "ijb", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads((tmp_path / "ijb" / "ijbc.json").read_text())
    assert list(table["tar@far"]) == [f"{far:.0e}" for far in IJB_FARS] and table["pairs"] == len(pairs)
    assert (tmp_path / "ijb" / "ijbc.png").stat().st_size > 1000 and "TAR (%)" in result.stdout

    # The scores, computed here image by image: aligned crop, flip test, faceness, pooling by loops.
    protocol = read_ijb(str(tmp_path / "IJBC"), "IJBC")
    backbone = checkpoint.restore_backbone(checkpoint.load_given(tmp_path / "run"))
    from gif_kernels.train.data.images import decode_pixels, to_input
    features = []
    for index, name in enumerate(protocol.names):
        crop = to_input(align_face(decode_pixels(tmp_path / "IJBC" / "loose_crop" / name, None, name),
                                   protocol.landmarks[index], SIZE))[None]
        with torch.no_grad():
            feature = backbone(crop) + backbone(crop.flip(-1))
        features.append(feature[0].double().numpy() * protocol.faceness[index])
    pooled = pooled_by_loops(np.stack(features), members)
    expected = [pooled[a] @ pooled[b] for a, b, _ in pairs]
    assert np.allclose(np.load(tmp_path / "ijb" / "ijbc.npy"), expected, atol=1e-5)


def test_ijb_of_a_model_zoo_state_dict(tmp_path):
    write_ijb(tmp_path / "IJBC")
    torch.save(build_backbone("iresnet18", 8).state_dict(), tmp_path / "r18.pth")
    result = run_tool("gif_kernels.train.evaluate_ijb", "--root", tmp_path / "IJBC", "--backbone", "iresnet18",
                      "--embedding-dim", "8", tmp_path / "r18.pth")
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads((tmp_path / "ijbc.json").read_text())
    assert table["model"] == str(tmp_path / "r18.pth") and len(table["tar@far"]) == len(IJB_FARS)


def nan_score(path):
    """The first image's faceness score replaced by nan."""
    first, rest = path.read_text().split("\n", 1)
    path.write_text(first.rsplit(" ", 1)[0] + " nan\n" + rest)


@pytest.mark.parametrize("damage,message", [
    (lambda root: (root / "meta" / "ijbc_face_tid_mid.txt").write_text("x.jpg 1 10\n"), "in its order"),
    (lambda root: (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 4 1\n1 2 0\n"),
     "template 4 of a pair"),
    (lambda root: (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 1\n"), "both labels"),
    (lambda root: (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 5\n"), "labels must be 0 or 1"),
    (lambda root: (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 2\n"), "template template label"),
    (lambda root: (root / "meta" / "ijbc_name_5pts_score.txt").unlink(), "not found"),
    (lambda root: nan_score(root / "meta" / "ijbc_name_5pts_score.txt"), "must be finite"),
])
def test_ijb_meta_errors_name_the_file(tmp_path, damage, message):
    write_ijb(tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        read_ijb(str(tmp_path), "IJBC")


def test_ijb_names_stay_inside_loose_crop(tmp_path):
    write_ijb(tmp_path)
    for file in ("name_5pts_score", "face_tid_mid"):
        path = tmp_path / "meta" / f"ijbc_{file}.txt"
        path.write_text(path.read_text().replace("0.jpg", "../../etc/passwd", 1))
    with pytest.raises(ValueError, match="points outside"):
        read_ijb(str(tmp_path), "IJBC")


# --- IResNet weights --------------------------------------------------------------------------------

# Keys of insightface's IResNet-50 state dict (arcface_torch's ms1mv3_arcface_r50 model zoo file).
INSIGHTFACE_R50_KEYS = ("conv1.weight", "bn1.running_var", "prelu.weight", "layer1.0.bn1.weight",
                        "layer1.0.downsample.0.weight", "layer1.0.downsample.1.running_mean", "layer2.3.conv2.weight",
                        "layer3.13.prelu.weight", "layer4.2.bn3.num_batches_tracked", "bn2.bias", "fc.weight",
                        "features.weight", "features.running_mean")


def test_iresnet50_has_insightface_keys():
    keys = build_backbone("iresnet50").state_dict().keys()
    assert set(INSIGHTFACE_R50_KEYS) <= keys and "layer3.14.conv1.weight" not in keys


def test_load_backbone_weights(tmp_path):
    source = build_backbone("iresnet18", 32, 32)
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "parallel.pth")
    for file in ("r18.pth", "parallel.pth"):
        loaded = load_backbone_weights(build_backbone("iresnet18", 32, 32), tmp_path / file)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))
    with pytest.raises(ValueError, match="does not fit the backbone"):
        load_backbone_weights(build_backbone("iresnet50", 32, 32), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"fc.weight of shape \(32, 2048\)"):
        load_backbone_weights(build_backbone("iresnet18", 64, 32), tmp_path / "r18.pth")
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_RunsCode(tmp_path / "ran")))
    with pytest.raises(ValueError, match="not a weights-only state dict"):
        load_backbone_weights(source, tmp_path / "evil.pth")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(FileNotFoundError, match="init_backbone: .* not found"):
        load_backbone_weights(source, tmp_path / "none.pth")


def test_trainer_starts_from_the_given_backbone(tmp_path):
    source = build_backbone("iresnet18", 16, SIZE)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    train(parse_run([*TINY, "--backbone", "iresnet18", "--init-backbone", str(tmp_path / "r18.pth"), "--lr", "0",
                     "--weight-decay", "0", "--out", str(tmp_path / "run")]))
    trained = checkpoint.restore_backbone(checkpoint.load_given(tmp_path / "run")).state_dict()
    assert all(torch.equal(trained[key], value) for key, value in source.state_dict().items()
               if key.endswith(("conv1.weight", "fc.weight")))  # learning rate 0: the weights as loaded
    (tmp_path / "r18.pth").unlink()  # a resumed run starts from its checkpoint, not from the file
    metrics = train(parse_run([*TINY, "--backbone", "iresnet18", "--steps", "8", "--resume", "--out",
                               str(tmp_path / "run")]))
    assert metrics["steps"] == 8


# --- ONNX export ------------------------------------------------------------------------------------

def test_onnx_export_matches_pytorch_at_another_batch(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    train(parse_run([*TINY, "--out", str(tmp_path / "run")]))
    result = run_tool("gif_kernels.train.export", tmp_path / "run", "--onnx", tmp_path / "backbone.onnx")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnxruntime matches PyTorch" in result.stdout
    backbone = checkpoint.restore_backbone(checkpoint.load_given(tmp_path / "run"))
    images = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    session = onnxruntime.InferenceSession(str(tmp_path / "backbone.onnx"), providers=["CPUExecutionProvider"])
    (output,) = session.run(["embeddings"], {"images": images.numpy()})
    with torch.no_grad():
        assert np.allclose(output, backbone(images).numpy(), atol=1e-4)


def test_export_of_a_run_without_a_backbone_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "features.npz", features=rng.normal(size=(40, 8)).astype(np.float32),
             labels=np.repeat(np.arange(8), 5))
    train(parse_run(["--data", f"features:{tmp_path / 'features.npz'}", "--verify-ids", "2", "--vocab", "3",
                     "--batch-size", "8", "--steps", "2", "--out", str(tmp_path / "run")]))
    result = run_tool("gif_kernels.train.export", tmp_path / "run", "--onnx", tmp_path / "x.onnx")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: checkpoint: this run trained a head on features data; it has no backbone"]


def test_alignment_matches_scikit_image_and_opencv_where_installed():
    # insightface's own pipeline: skimage's SimilarityTransform, then cv2.warpAffine (neither is a dependency).
    cv2 = pytest.importorskip("cv2")
    skimage_transform = pytest.importorskip("skimage.transform")
    generator = np.random.default_rng(4)
    for _ in range(5):
        marks = ARCFACE_LANDMARKS * generator.uniform(0.5, 3) + generator.normal(0, 3, (5, 2)) + generator.uniform(0, 99, 2)
        estimate = skimage_transform.SimilarityTransform()
        estimate.estimate(marks, ARCFACE_LANDMARKS)
        matrix = similarity_transform(marks, ARCFACE_LANDMARKS)
        assert np.allclose(matrix, estimate.params[:2], atol=1e-9)
        image = generator.integers(0, 256, (generator.integers(80, 300), generator.integers(80, 300), 3), np.uint8)
        expected = cv2.warpAffine(image, estimate.params[:2], (112, 112), borderValue=0.0)
        ours = warp_affine(torch.from_numpy(image).permute(2, 0, 1).contiguous(), matrix, 112).permute(1, 2, 0)
        assert np.abs(ours.numpy().astype(int) - expected).max() <= 1  # OpenCV interpolates in fixed point
