"""The edge on ARM64: the pcdet_ext_edge wheel and requirements-edge.txt install with aarch64 wheels only
(an aarch64 CPython 3.11 under QEMU user mode, ../shared/tools/arm64-python.sh), encode real scans with
an exported bundle there, and the two machines read each other's frames."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcdet_ext.algorithms.bitstream import decode_frame, encode_frame
from pcdet_ext.edge import EdgeBundle, LeanEdge, read_scan
from tier2 import REPO

ARM64_TOOL = os.environ.get("PCDET_EXT_ARM64_TOOL", str(REPO.parent / "shared/tools/arm64-python.sh"))
CELL = (3, 64)
PER_MILLION_LIMIT = 1000  # codes the two machines' float encoders may choose differently (near-ties)


@pytest.fixture(scope="session")
def arm64_python(tmp_path_factory):
    """DIR/py: aarch64 python with the edge wheel and its requirements installed (aarch64 wheels only)."""
    if not ARM64_TOOL:
        pytest.skip("PCDET_EXT_ARM64_TOOL is empty: the ARM64 check runs as its own step (.ci/run runs it beside "
                    "the tests)")
    if not Path(ARM64_TOOL).is_file():
        pytest.skip(f"no ARM64 emulation tool at {ARM64_TOOL} (PCDET_EXT_ARM64_TOOL)")
    wheels = tmp_path_factory.mktemp("edge_wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels),
                            str(REPO / "edge")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(wheels.glob("pcdet_ext_edge-*.whl"))
    root = Path(os.environ.get("PCDET_EXT_ARM64_DIR") or tmp_path_factory.mktemp("arm64"))
    made = subprocess.run(["bash", str(ARM64_TOOL), str(root), "-r", str(REPO / "requirements-edge.txt"), str(wheel)],
                          capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]  # names a requirement without aarch64 wheel
    return root / "py"


def test_arm64_edge_frames_decode_on_x86_and_x86_frames_decode_on_arm64(arm64_python, exported, tmp_path):
    _, _, _, _, bundle_dir, scans = exported
    bundle = EdgeBundle.load(bundle_dir)
    scan_dir, x86_dir = tmp_path / "scans", tmp_path / "x86"
    scan_dir.mkdir()
    x86_dir.mkdir()
    lean = LeanEdge(bundle, *CELL)
    for path in scans[:3]:
        os.symlink(path, scan_dir / path.name)
        (x86_dir / (path.stem + ".rqf")).write_bytes(lean.encode(read_scan(path))[0])
    # the emulated edge sends its frames, signed, to a split server here (the real handler, this model)
    from pcdet_ext.cli.split_server import frame_handler
    from pcdet_ext.deploy.runtime import ServerRuntime
    from pcdet_ext.deploy.server import FrameServer
    from pcdet_ext.edge.auth import read_keys, write_new_key
    model, dataset, models = exported[:3]
    write_new_key("pi4", tmp_path / "pi4.key")
    server = FrameServer(("127.0.0.1", 0), frame_handler(ServerRuntime(model, dataset, models), list(dataset.class_names)),
                         keys=read_keys(tmp_path / "pi4.key"))
    server.start()
    try:
        arm = subprocess.run([str(arm64_python), "-m", "pcdet_ext.edge", "--bundle", str(bundle_dir), "--input",
                              str(scan_dir), "--out", str(tmp_path / "arm"), "--num_codebooks", str(CELL[0]),
                              "--num_embeddings", str(CELL[1]), "--remote", f"127.0.0.1:{server.port}",
                              "--key_file", str(tmp_path / "pi4.key")],
                             capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
        assert arm.returncode == 0, arm.stdout[-2000:] + arm.stderr[-3000:]
        assert server.counters.snapshot()["served"] == 3, server.counters.snapshot()
    finally:
        server.stop()
    reader = (f"import sys, hashlib\nfrom pathlib import Path\nimport platform\nfrom pcdet_ext.edge import EdgeBundle\n"
              f"from pcdet_ext.algorithms.bitstream import decode_frame\nb = EdgeBundle.load({str(bundle_dir)!r})\n"
              f"print(platform.machine())\n"
              f"for p in sorted(Path({str(x86_dir)!r}).glob('*.rqf')):\n"
              f"    f = decode_frame(p.read_bytes(), b.models, b.model_id, 5, 256)\n"
              f"    print(hashlib.sha256(f.cells.tobytes() + f.codes.astype('<i8').tobytes()).hexdigest())\n")
    read = subprocess.run([str(arm64_python), "-c", reader], capture_output=True, text=True, timeout=900)
    assert read.returncode == 0, read.stderr[-3000:]
    machine, *digests = read.stdout.split()
    assert machine == "aarch64"
    differing, codes, identical = 0, 0, 0
    for path, digest in zip(sorted(x86_dir.glob("*.rqf")), digests):
        ours = decode_frame(path.read_bytes(), bundle.models, bundle.model_id, 5, 256)
        assert digest == hashlib.sha256(ours.cells.tobytes() + ours.codes.astype("<i8").tobytes()).hexdigest()
        data = (tmp_path / "arm" / path.name).read_bytes()
        theirs = decode_frame(data, bundle.models, bundle.model_id, 5, 256)
        assert np.array_equal(theirs.cells, ours.cells)  # the same pillars: voxelisation is exact
        # the coder is: x86 writes the arm64 frame's codes to the same bytes
        assert encode_frame(theirs.cells, theirs.codes, CELL[1], bundle.models, bundle.model_id) == data
        identical += data == path.read_bytes()
        differing += int((theirs.codes != ours.codes).sum())
        codes += ours.codes.size
    print(f"arm64 vs x86 at {CELL}: {identical}/3 frames identical, {1e6 * differing / codes:.0f} codes per million differ")
    assert 1e6 * differing / codes <= PER_MILLION_LIMIT
