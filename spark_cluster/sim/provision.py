"""Put the image and the model on every simulated node (what a Spark owner does once by hand)."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from .cluster import SimNode, _nsenter
from .image import MODEL_NAME, Image


def model_path_on_node() -> str:
    return f"/srv/models/{MODEL_NAME}"


def load_image(node: SimNode, image: Image) -> bool:
    """docker load the archive unless the node already has that image ID. True when loaded."""
    have = _nsenter(node, "docker", "image", "inspect", "--format", "{{.Id}}", image.tag, check=False)
    if have.returncode == 0 and have.stdout.strip() == image.image_id:
        return False
    present = _nsenter(node, "docker", "image", "inspect", image.image_id, check=False).returncode == 0
    if not present:
        _nsenter(node, "docker", "load", "-q", "-i", str(image.archive), timeout=1200)
    _nsenter(node, "docker", "tag", image.image_id, image.tag)
    got = _nsenter(node, "docker", "image", "inspect", "--format", "{{.Id}}", image.tag).stdout.strip()
    if got != image.image_id:
        from .cluster import SimError

        raise SimError(f"{node.name}: loaded image has ID {got}, expected {image.image_id}")
    # images of earlier builds are only disk on the node
    _nsenter(node, "docker", "image", "prune", "-f", check=False)
    return True


def install_model(node: SimNode, image: Image) -> None:
    dest = node.path / "srv" / "models" / MODEL_NAME
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(image.model_dir, dest)


def provision(nodes: list[SimNode], image: Image, *, log=print) -> float:
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        loaded = list(pool.map(lambda n: load_image(n, image), nodes))
    for node in nodes:
        install_model(node, image)
    took = time.monotonic() - t0
    if any(loaded):
        log(f"image {image.tag} ({image.image_id[:19]}) loaded into {sum(loaded)} node(s) in {took:.1f}s")
    return took
