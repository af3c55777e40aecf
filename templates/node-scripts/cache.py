"""Run on a node, in a throwaway container of the group's image (the files are root's, written by
the engine's containers), the cluster's cache folder mounted: seal, check or look at one image's
cache folder. Standard library only (it runs in the image's Python); prints one JSON line.
spark_cluster/cache_seal.py builds its command and reads its answer.

  seal  ROOT IMAGE          after an engine that used the cache became ready: its manifest (each
                            file's size, modification time and SHA-256) written beside the files
  check ROOT IMAGE          before an engine starts: every file changed or added since the seal (every
                            file when there is none) moved, never deleted, to
                            ROOT/.set-aside/IMAGE/<UTC time>/ (same relative path)
  look  ROOT IMAGE          what check would find, nothing moved
  manifest ROOT IMAGE       the seal's files and the folder's (`sync` copies a sealed cache from it)
  adopt ROOT IMAGE          after `sync` copied a sealed cache here: each file of the source's seal
                            (MANIFEST, prepended to this text) checked by size and SHA-256, those that
                            differ set aside, and the folder sealed with them (its own times) and with
                            what this node's own seal lists that is unchanged (its own ranks' files)
"""

import hashlib
import json
import os
import stat
import sys
import time

SEAL = ".spark-cluster-seal.json"
ASIDE = ".set-aside"
EXAMPLES = 5


def listing(folder):
    """Each regular file or symlink below folder (but the seal): relative path -> (size, mtime_ns)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, folder)
            if rel in (SEAL, SEAL + ".tmp"):
                continue
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def digest(path):
    if os.path.islink(path):
        return hashlib.sha256(os.readlink(path).encode()).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_seal(folder):
    """The manifest, or None (none, or one that cannot be read: nothing is trusted then)."""
    try:
        with open(os.path.join(folder, SEAL)) as f:
            seal = json.load(f)
        files = seal["files"]
        return {"sealed_at": str(seal["sealed_at"]), "files": {str(k): (int(v[0]), int(v[1])) for k, v in files.items()}}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def suspects(files, seal):
    """What was changed or added since the seal: every file when there is none."""
    if seal is None:
        return sorted(files)
    return sorted(rel for rel, sig in files.items() if seal["files"].get(rel) != sig)


def utc_now():
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def seal(root, image):
    folder = os.path.join(root, image)
    os.makedirs(folder, exist_ok=True)
    files = listing(folder)
    sealed_at = utc_now()
    write_seal(folder, sealed_at, {rel: [size, mtime, digest(os.path.join(folder, rel))] for rel, (size, mtime) in files.items()})
    return {"sealed_at": sealed_at, "files": len(files), "bytes": sum(s for s, _ in files.values())}


def aside_size(root, image):
    total, sets = 0, 0
    base = os.path.join(root, ASIDE, image)
    if os.path.isdir(base):
        sets = len(os.listdir(base))
        total = sum(size for size, _ in listing(base).values())
    return {"aside_sets": sets, "aside_bytes": total}


def check(root, image, move):
    folder = os.path.join(root, image)
    files = listing(folder) if os.path.isdir(folder) else {}
    seal_ = read_seal(folder)
    found = suspects(files, seal_)
    answer = {"sealed_at": seal_["sealed_at"] if seal_ else None, "suspect": len(found),
              "suspect_bytes": sum(files[rel][0] for rel in found), "examples": found[:EXAMPLES]}
    if move and found:
        when = utc_now()
        to = os.path.join(ASIDE, image, when)
        for rel in found:
            target = os.path.join(root, to, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(folder, rel), target)
        answer["moved_to"] = to
    kept = [rel for rel in files if rel not in found] if move else list(files)
    answer.update(files=len(kept), bytes=sum(files[rel][0] for rel in kept), **aside_size(root, image))
    return answer


def write_seal(folder, sealed_at, entries):
    tmp = os.path.join(folder, SEAL + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"sealed_at": sealed_at, "files": entries}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, SEAL))


def manifest(root, image):
    folder = os.path.join(root, image)
    try:
        with open(os.path.join(folder, SEAL)) as f:
            seal_ = json.load(f)
    except (OSError, ValueError):
        seal_ = None
    files = listing(folder) if os.path.isdir(folder) else {}
    return {"sealed": seal_, "files": {rel: size for rel, (size, _) in files.items()}}


def own_entries(folder):
    """This node's seal as written ({path: [size, mtime, sha256]}), {} when there is none or it cannot be read."""
    try:
        with open(os.path.join(folder, SEAL)) as f:
            files = json.load(f)["files"]
        return {str(k): [int(v[0]), int(v[1]), str(v[2])] for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return {}


def adopt(root, image, source):
    """source: the sealing node's manifest ({"sealed_at", "files": {path: [size, mtime, sha256]}}). A
    tensor-parallel rank's own files (vLLM's torch_compile_cache/<key>/rank_<n>_0) are on its node
    alone: what this node sealed itself and still has unchanged stays sealed beside the source's."""
    folder = os.path.join(root, image)
    os.makedirs(folder, exist_ok=True)
    files = listing(folder)
    own = own_entries(folder)
    entries, bad = {}, []
    for rel, (size, _, sha) in sorted(source["files"].items()):
        have = files.get(rel)
        if have is not None and have[0] == size and digest(os.path.join(folder, rel)) == sha:
            entries[rel] = [size, have[1], sha]
        elif have is not None:
            bad.append(rel)
    for rel, entry in own.items():
        if rel not in source["files"] and files.get(rel) == (entry[0], entry[1]):
            entries[rel] = entry
    answer = {"sealed_at": source["sealed_at"], "files": len(entries), "bytes": sum(e[0] for e in entries.values()),
              "suspect": len(bad), "suspect_bytes": sum(files[rel][0] for rel in bad), "examples": bad[:EXAMPLES]}
    if bad:
        to = os.path.join(ASIDE, image, utc_now())
        for rel in bad:
            target = os.path.join(root, to, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(folder, rel), target)
        answer["moved_to"] = to
    write_seal(folder, source["sealed_at"], entries)
    return answer


def main(argv):
    mode, root, image = argv
    if mode == "seal":
        answer = seal(root, image)
    elif mode in ("check", "look"):
        answer = check(root, image, move=mode == "check")
    elif mode == "manifest":
        answer = manifest(root, image)
    elif mode == "adopt":
        answer = adopt(root, image, MANIFEST)  # noqa: F821 (prepended)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({"mode": mode, **answer}))


if __name__ == "__main__":
    main(sys.argv[1:])
