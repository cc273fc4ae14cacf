"""
The checkpoint format, in one place: what ckpt.pt holds, how it is written and checked, how a model
comes back from it, what a resume checks, and the sidecars that tie an exported file to its checkpoint.

A checkpoint is one torch.save'd dict of tensors and plain Python values, loadable with weights_only=True
(no pickled code can run), that holds everything needed to rebuild the model:
    format, version       what this file is, so a foreign .pt is refused with a clear message
    sha256                a checksum of all the rest (content_sha256), so a damaged file is refused
    model_config          DiTConfig as a dict
    diffusion_config      DiffusionConfig as a dict
    model, ema            state dicts (ema = the exponential moving average used for sampling)
    class_names           label names of the training set (["0", ..., "9"] for MNIST)
  written by train.py for --resume (training_state):
    optimizer, scaler     AdamW's and the fp16 GradScaler's state (scaler None without fp16)
    step, wall_time_s     optimizer steps done and the run's wall time so far
    rng                   {"data": the batch generator's state, "ranks": every rank's global RNG state}
    dataset, args         the dataset's name and every training setting
  written by tools/ship_checkpoint.py instead (a sampling-only file, EMA weights as "model"):
    sampling_only, weights, training, scores

A sidecar `<file>.json` beside each file export.py writes names the checkpoint it came from (its
SHA-256), the configs, the class names and the versions; backends refuse a file whose sidecar is
missing or disagrees with the file, the checkpoint or the GPU.
"""
import dataclasses
import hashlib
import json
import os
import sys
import warnings

import torch

from cli import UserError, first_line
from diffusion import DiffusionConfig, GaussianDiffusion
from dit import DiT, DiTConfig
from guard import atomic_write, remove_stale_temp_files, same_file
from recipe import SHIPPED_CKPT

CHECKPOINT_FORMAT = "dit-checkpoint"
CHECKPOINT_VERSION = 2          # version 2 carries the checksum; version 1 files (without one) still load
RESUME_KEYS = ("ema", "optimizer", "step", "rng")


def checkpoint_or_shipped(path):
    """--ckpt as given, or (None) the shipped checkpoint, said in one line on stderr."""
    if path is not None:
        return path
    if not os.path.isfile(SHIPPED_CKPT):
        raise UserError(f"no --ckpt given and the shipped model {SHIPPED_CKPT} is missing; pass --ckpt "
                        f"RUN/ckpt.pt")
    print(f"note: no --ckpt given: using the shipped model {os.path.relpath(SHIPPED_CKPT)} "
          f"(DiT-T/4 trained on MNIST)", file=sys.stderr)
    return SHIPPED_CKPT


# ----------------------------------------------------------------------------------------------
#                                     Writing and reading
# ----------------------------------------------------------------------------------------------

def config_dict(config):
    """A dataclass config as a plain dict (what checkpoints and sidecars store)."""
    return dataclasses.asdict(config)


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file: identifies the checkpoint an exported ONNX or engine was built from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(value, h=None):
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes, every other value's repr,
    dict keys in sorted order. A flipped byte anywhere in the weights changes it."""
    h = h or hashlib.sha256()
    if isinstance(value, dict):
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            content_sha256(value[key], h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            content_sha256(item, h)
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(repr(value).encode())
    return h.hexdigest()


def save_checkpoint(path, state):
    """Save a checkpoint dict atomically, stamped with the format, the version and the content's checksum.
    Temp files of earlier, killed saves to the same path are removed first."""
    remove_stale_temp_files(path)
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    state["sha256"] = content_sha256(state)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu"):
    """Load and validate a checkpoint; every way it can be wrong is a one-line UserError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise UserError(f"checkpoint {path} {what}; pass the ckpt.pt written by train.py")
    try:
        with warnings.catch_warnings():      # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        # The weights-only unpickler names a refused import as "GLOBAL module.name"; any other
        # failure (bad opcode, broken zip) means the bytes are not a complete torch file.
        if "GLOBAL" in str(e):
            raise UserError(f"{path} contains pickled code or objects, which are refused for safety; "
                            f"only checkpoints written by train.py load") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file); "
                        f"use the ckpt.pt written by train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a DiT checkpoint of this project; "
                        f"pass the ckpt.pt written by train.py")
    if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise UserError(f"{path} has checkpoint format version {ckpt.get('version')}, this code reads "
                        f"versions 1-{CHECKPOINT_VERSION}; retrain or use the matching code version")
    if ckpt["version"] >= 2 and ckpt.pop("sha256", None) != content_sha256(ckpt):
        raise UserError(f"{path} is damaged: its content does not match its checksum (a changed or flipped "
                        f"byte); use an intact copy or an earlier checkpoint")
    missing = [k for k in ("model_config", "diffusion_config", "model") if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; it is incomplete, use another checkpoint")
    return ckpt


# ----------------------------------------------------------------------------------------------
#                                   From a checkpoint to a model
# ----------------------------------------------------------------------------------------------

def configs_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild (DiTConfig, DiffusionConfig) from the dicts stored in a checkpoint (or an export sidecar)."""
    # A learn_sigma key in the diffusion config is ignored: the model config decides it, and the diffusion
    # reads it off the network's output channels.
    try:
        diffusion = {k: v for k, v in ckpt["diffusion_config"].items() if k != "learn_sigma"}
        return DiTConfig(**ckpt["model_config"]), DiffusionConfig(**diffusion)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path} has a model config this code does not understand ({e}); "
                        f"it was written by another version") from None


def class_names_of(meta, model_config):
    """A checkpoint's or sidecar's class names; "0", "1", ... for a file without them."""
    return meta.get("class_names") or [str(i) for i in range(model_config.num_classes)]


def model_from_checkpoint(path, device="cpu", use_ema=True):
    """Checkpoint file -> (DiT in eval mode on device, GaussianDiffusion, class_names, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model_config, diffusion_config = configs_from_checkpoint(ckpt, path)
    model = DiT(model_config)
    if not use_ema and ckpt.get("sampling_only"):
        raise UserError(f"{path} is a sampling-only checkpoint: it holds the EMA weights only; drop --no-ema "
                        f"(or --weights model)")
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match its model config ({first_line(e)}); "
                        f"the file is corrupt") from None
    return (model.to(device).eval(), GaussianDiffusion(diffusion_config),
            class_names_of(ckpt, model_config), ckpt)


# ----------------------------------------------------------------------------------------------
#                                   Training state and resume
# ----------------------------------------------------------------------------------------------

def training_state(configs, parts, step, wall_time_s, rng, class_names, dataset, settings):
    """The dict train.py saves. configs: {"model": dict, "diffusion": dict}; parts: model, ema, optimizer,
    scaler (None without fp16); rng: {"data": generator state, "ranks": every rank's RNG state}."""
    return {"model_config": configs["model"], "diffusion_config": configs["diffusion"],
            "model": parts["model"].state_dict(), "ema": parts["ema"].state_dict(),
            "optimizer": parts["optimizer"].state_dict(),
            "scaler": parts["scaler"].state_dict() if parts["scaler"] else None,
            "step": step, "wall_time_s": wall_time_s, "rng": rng, "class_names": class_names,
            "dataset": dataset, "args": settings}


def checkpoint_to_resume(resume, ckpt_path, say):
    """--resume PATH, or auto (OUT/ckpt.pt if it exists), or None -> the file to resume or None. A run folder
    that holds a checkpoint is never started over."""
    path = ckpt_path if resume == "auto" else resume
    if os.path.exists(ckpt_path) and not (path and same_file(path, ckpt_path)):
        raise UserError(f"{ckpt_path} exists: this folder holds a run; continue it with --resume auto, "
                        f"or pass another --out for a new one")
    if resume == "auto" and not os.path.exists(ckpt_path):
        say(f"--resume auto: no {ckpt_path} yet, starting a new run")
        return None
    return path or None


def load_for_resume(path, configs):
    """Load a checkpoint to continue training. Its configs must equal the flags' ones (configs, as dicts):
    a resume continues the run the flags describe, and silently taking the checkpoint's could ignore one."""
    ckpt = load_checkpoint(path)
    if ckpt.get("sampling_only"):
        raise UserError(f"{path} is a sampling-only checkpoint (EMA weights, no optimizer or RNG state): it "
                        f"cannot be resumed; sample or export from it, or train a new run without --resume")
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: it cannot be resumed (sample from it instead)")
    defaults = config_dict(DiffusionConfig())     # fields newer than the checkpoint take their defaults
    theirs_all = (ckpt["model_config"], {**defaults, **ckpt["diffusion_config"]})
    for (what, mine), theirs in zip(configs.items(), theirs_all):
        diff = [f"{k}: checkpoint {theirs.get(k)!r}, flags {v!r}" for k, v in mine.items()
                if theirs.get(k) != v]
        if diff:
            raise UserError(f"{path} was trained with another {what} config ({'; '.join(diff)}); resume with "
                            f"the flags of the run that wrote it")
    return ckpt


def restore_training(ckpt, parts, data_gen, rank, device):
    """Put a resumable checkpoint's weights, optimizer, scaler and RNG states back in place."""
    for name in ("model", "ema", "optimizer"):
        parts[name].load_state_dict(ckpt[name])
    if parts["scaler"] is not None and ckpt.get("scaler"):
        parts["scaler"].load_state_dict(ckpt["scaler"])
    ranks = ckpt["rng"]["ranks"]
    mine = ranks[rank % len(ranks)]                # a run resumed on more ranks reuses the first states
    torch.set_rng_state(mine["torch"])
    if device.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], device)
    data_gen.set_state(ckpt["rng"]["data"])


# ----------------------------------------------------------------------------------------------
#                                 Sidecars: what a file was built from
# ----------------------------------------------------------------------------------------------

SIDECAR_FORMAT = "dit-export"
SIDECAR_VERSION = 2            # version 2 carries the sidecar's own checksum


def sidecar_path(artifact):
    return os.fspath(artifact) + ".json"


def sidecar_sha256(meta):
    """Checksum of a sidecar's own content (all but this field), so an edited sidecar is refused."""
    content = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def artifact_sha256(artifact):
    """SHA-256 of an exported file, and of its external weights (`<file>.data`) when it has them."""
    digest = file_sha256(artifact)
    data = os.fspath(artifact) + ".data"
    return digest + ("+" + file_sha256(data) if os.path.isfile(data) else "")


def write_sidecar(artifact, meta):
    """Write `<artifact>.json`: meta, the artifact's hash (a file swapped after export is refused) and the
    sidecar's own checksum (so are hand-edited configs or class names, which would sample wrong images)."""
    meta = {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "artifact": os.path.basename(artifact),
            "artifact_sha256": artifact_sha256(artifact), **meta}
    meta["sidecar_sha256"] = sidecar_sha256(meta)
    atomic_write(sidecar_path(artifact), lambda f: json.dump(meta, f, indent=1), binary=False)
    return meta


def load_sidecar(artifact):
    """Read the sidecar of an ONNX file or engine; a missing or unreadable one is a one-line UserError."""
    artifact = os.fspath(artifact)
    if not os.path.isfile(artifact):
        raise UserError(f"{artifact} does not exist; run `python export.py --ckpt RUN/ckpt.pt` first")
    path = sidecar_path(artifact)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing, so {artifact} cannot be matched to a checkpoint; "
                        f"rerun export.py to write both")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable sidecar ({type(e).__name__}); rerun export.py") from None
    if (not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT
            or meta.get("version") != SIDECAR_VERSION):
        raise UserError(f"{path} is not a sidecar written by this export.py (format {SIDECAR_FORMAT} "
                        f"v{SIDECAR_VERSION}); rerun export.py")
    if meta.get("sidecar_sha256") != sidecar_sha256(meta):
        raise UserError(f"{path} was changed after export (its checksum does not match its content); "
                        f"rerun export.py")
    return meta


def check_sidecar(meta, artifact, ckpt_path=None, gpu_name=None):
    """Refuse an artifact that changed after export, comes from another checkpoint (ckpt_path: its hash is
    compared) or, for an engine, was built on another GPU (gpu_name: the GPU it is about to run on)."""
    artifact = os.fspath(artifact)
    if artifact_sha256(artifact) != meta.get("artifact_sha256"):
        recorded, data = str(meta.get("artifact_sha256")), artifact + ".data"
        if "+" not in recorded and os.path.isfile(data) and file_sha256(artifact) == recorded:
            raise UserError(f"{data} does not belong to {artifact}, "
                            f"which was exported with its weights inside it; delete {data}")
        raise UserError(f"{artifact} differs from the file its sidecar describes (replaced after export?); "
                        f"rerun export.py")
    source = meta.get("checkpoint", {})
    fix = f"rerun `python export.py --ckpt {ckpt_path}`" if ckpt_path else "rerun export.py"
    if ckpt_path is not None:
        digest = file_sha256(ckpt_path)
        if digest != source.get("sha256"):
            raise UserError(f"{artifact} was exported from checkpoint {source.get('path')} "
                            f"(sha256 {str(source.get('sha256'))[:12]}), not from {ckpt_path} "
                            f"(sha256 {digest[:12]}); {fix}")
    built_on = (meta.get("gpu") or {}).get("name")
    if meta.get("kind") == "engine" and gpu_name is not None and built_on != gpu_name:
        raise UserError(f"{artifact} was built for GPU {built_on!r}, this machine has {gpu_name!r}; "
                        f"TensorRT engines only run on the GPU they were built for: rerun export.py here")
