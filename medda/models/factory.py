"""Network factory (MONAI nets for 2D/3D, segmentation-models-pytorch for 2D) and checkpoint IO.

Batch norm is the default: AdaBN, TENT and OSUDA adapt batch-norm layers, and MONAI's own defaults
(instance norm) would make them silently do nothing. Nothing is downloaded: smp encoders use
`encoder_weights=None`, MONAI FlexibleUNet `pretrained=False`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medda.config import ModelConfig
from medda.errors import MeddaError

CHECKPOINT_FORMAT = "medda-checkpoint/1"


def build_model(cfg: ModelConfig, spatial_dims: int, num_classes: int) -> nn.Module:
    """Build the network named in `cfg` producing (B, num_classes, *spatial) logits."""
    norm = cfg.norm
    ch = list(cfg.channels)
    if cfg.name == "unet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=spatial_dims, in_channels=cfg.in_channels, out_channels=num_classes, channels=ch,
            strides=[2] * (len(ch) - 1), num_res_units=cfg.num_res_units, norm=norm, dropout=cfg.dropout,
        )
    if cfg.name == "dynunet":
        from monai.networks.nets import DynUNet

        strides = [1] + [2] * (len(ch) - 1)
        return DynUNet(
            spatial_dims=spatial_dims, in_channels=cfg.in_channels, out_channels=num_classes,
            kernel_size=[3] * len(ch), strides=strides, upsample_kernel_size=strides[1:], filters=ch,
            norm_name=norm, dropout=cfg.dropout or None, res_block=cfg.num_res_units > 0,
        )
    if cfg.name == "segresnet":
        from monai.networks.nets import SegResNet

        return SegResNet(
            spatial_dims=spatial_dims, init_filters=ch[0], in_channels=cfg.in_channels, out_channels=num_classes,
            norm=norm, dropout_prob=cfg.dropout or None, blocks_down=tuple([1, 2, 2, 4][: len(ch)]),
        )
    if cfg.name == "flexible_unet":
        from monai.networks.nets import FlexibleUNet

        return FlexibleUNet(
            in_channels=cfg.in_channels, out_channels=num_classes, backbone=cfg.encoder, pretrained=False,
            spatial_dims=spatial_dims, norm=norm, dropout=cfg.dropout,
        )
    if cfg.name.startswith("smp_"):
        if spatial_dims != 2:
            raise MeddaError(f"model.name={cfg.name}: segmentation-models-pytorch nets are 2D; use data.mode=2d")
        if norm != "batch":
            raise MeddaError(f"model.name={cfg.name}: smp encoders use batch norm; set model.norm=batch")
        import segmentation_models_pytorch as smp

        arch = {"smp_unet": smp.Unet, "smp_unetplusplus": smp.UnetPlusPlus, "smp_fpn": smp.FPN}[cfg.name]
        return arch(encoder_name=cfg.encoder, encoder_weights=None, in_channels=cfg.in_channels, classes=num_classes)
    raise MeddaError(f"model.name={cfg.name} is not supported")  # pragma: no cover - pydantic refuses it first


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write weights plus what is needed to rebuild and reuse the model (architecture, preprocessing, classes).

    `meta` must hold only plain types (str/int/float/bool/list/dict/None): checkpoints load with weights_only=True.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # a diverged model must never become a checkpoint that is later selected or registered
        raise MeddaError(f"{path}: not saved: {len(broken)} of {len(state)} weight tensors hold NaN or infinite "
                         f"values (first: {broken[0]}); training diverged (check image intensities and optim.lr)")
    write_atomically({"format": CHECKPOINT_FORMAT, "meta": meta, "state_dict": state}, path)
    return path


def write_atomically(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` so that a crash at any moment leaves the old file or the new one, never a mix.

    The data goes to a temporary file in the same folder (same file system: the rename is atomic), is flushed to
    disk (fsync), and replaces `path`; the folder is synced so that the rename itself survives a power loss.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # folders cannot be opened for syncing on every platform
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint dict safely (weights_only=True) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise MeddaError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files are a user error
        raise MeddaError(f"{path}: not a readable medda checkpoint ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise MeddaError(f"{path}: field 'format' missing or not {CHECKPOINT_FORMAT}: not a medda checkpoint")
    return ckpt


def _checked_meta(path: Path | str, ckpt: dict[str, Any]) -> tuple[dict[str, Any], ModelConfig]:
    """The checkpoint's metadata, refused in one line when a field needed to rebuild the model is wrong."""
    from medda.config import validate

    meta = ckpt.get("meta")
    if not isinstance(meta, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise MeddaError(f"{path}: fields 'meta' and 'state_dict' must be mappings: not a usable medda checkpoint")
    for key, kind in (("model", dict), ("spatial_dims", int), ("num_classes", int), ("class_names", list),
                      ("data", dict)):
        if not isinstance(meta.get(key), kind):
            raise MeddaError(f"{path}: field 'meta.{key}' missing or not a {kind.__name__}: not a usable checkpoint")
    if meta["spatial_dims"] not in (2, 3) or meta["num_classes"] < 2 or len(meta["class_names"]) != meta["num_classes"]:
        raise MeddaError(f"{path}: field 'meta' is inconsistent (spatial_dims {meta['spatial_dims']}, num_classes "
                         f"{meta['num_classes']}, {len(meta['class_names'])} class names)")
    mode = meta["data"].get("mode")
    if mode is not None and (2 if mode == "2d" else 3) != meta["spatial_dims"]:
        raise MeddaError(f"{path}: field 'meta.data.mode' is {mode} but 'meta.spatial_dims' is {meta['spatial_dims']}")
    return meta, validate(ModelConfig, meta["model"], f"{path} (checkpoint metadata 'meta.model')")


def load_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from a checkpoint's metadata and load its weights.

    Metadata that does not describe the stored weights (another architecture, class count or channel count)
    is refused in one line naming the checkpoint, instead of PyTorch's many-line size-mismatch report.
    """
    ckpt = read_checkpoint(path)
    meta, model_cfg = _checked_meta(path, ckpt)
    model = build_model(model_cfg, meta["spatial_dims"], meta["num_classes"])
    state = ckpt["state_dict"]
    for name, module in model.named_modules():
        # TENT-style models normalise with batch statistics and carry no running statistics.
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and f"{name}.running_mean" not in state:
            module.track_running_stats = False
            module.running_mean = module.running_var = module.num_batches_tracked = None
            state.pop(f"{name}.num_batches_tracked", None)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        detail = detail.split(":", 1)[-1].strip()[:200]
        raise MeddaError(f"{path}: checkpoint metadata (fields 'meta.model', 'meta.num_classes', "
                         f"'meta.spatial_dims') does not match its weights ({detail})") from None
    return model, meta
