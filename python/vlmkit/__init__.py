"""vlmkit: define and train vision-language models, from C++ and from Python.

Every model and block is a ``torch.nn.Module`` backed by the C++ core
(``vlmkit._C``). Quick start::

    import torch, vlmkit
    model = vlmkit.build_model({"architecture": "two_tower"})
    out = model(torch.rand(8, 3, 64, 64), torch.randint(1, 256, (8, 16)))
    out.loss.backward()
"""
from __future__ import annotations

import os as _os

import torch as _torch  # loads libtorch before the extension

from . import _C
from ._module import CppModule, slot_classes, wrap_block
from . import checkpoint, export, lora, text
from .trainer import FusedAdamW, Trainer
from .models import (ARCHITECTURES, EncoderDecoder, EncoderTextDecoder, TwoLeg, TwoTower,
                     build_model, default_config)

__version__: str = _C.__version__
#: The LibTorch version the extension was compiled against.
torch_version: str = _C.torch_version

set_num_threads = _C.set_num_threads
thread_info = _C.thread_info
apply_default_threads = _C.apply_default_threads
apply_default_allocator = _C.apply_default_allocator
set_attention_kernel = _C.set_attention_kernel
attention_kernel = _C.attention_kernel
set_decode_kernel = _C.set_decode_kernel
decode_kernel = _C.decode_kernel
fused_attention = _C.fused_attention
set_gemm_kernel = _C.set_gemm_kernel
gemm_kernel = _C.gemm_kernel
linear = _C.linear
matmul = _C.matmul
have_dnnl_sgemm = _C.have_dnnl_sgemm
set_mlp_kernel = _C.set_mlp_kernel
mlp_kernel = _C.mlp_kernel
fused_gelu_mlp = _C.fused_gelu_mlp
set_norm_kernel = _C.set_norm_kernel
norm_kernel = _C.norm_kernel
rms_norm = _C.rms_norm
group_norm_gelu = _C.group_norm_gelu
rotary = _C.rotary


EncoderOutput = _C.EncoderOutput
TwoTowerOutput = _C.TwoTowerOutput
TwoLegOutput = _C.TwoLegOutput
clip_loss = _C.clip_loss
siglip_loss = _C.siglip_loss
classification_loss = _C.classification_loss
matching_loss = _C.matching_loss

MultiheadAttention = wrap_block(_C.MultiheadAttention, "MultiheadAttention",
                                "Multi-head attention: MultiheadAttention(embed_dim, num_heads, "
                                "context_dim=0, dropout=0.0, bias=True).")
TransformerBlock = wrap_block(_C.TransformerBlock, "TransformerBlock",
                              "Pre-norm transformer block: TransformerBlock(d_model, num_heads, "
                              "mlp_ratio=4.0, dropout=0.0, cross_attention=False, ...).")
ViT = wrap_block(_C.ViT, "ViT", "Vision Transformer image encoder: ViT(image_size=64, "
                 "patch_size=8, d_model=128, depth=4, num_heads=4, pos_embedding='learned', "
                 "pool='cls', stem='patch', ...).")
ConvStage = wrap_block(_C.ConvStage, "ConvStage", "Conv stage image encoder: "
                       "ConvStage(image_size=64, channels=[32, 64, 128], d_model=128).")
TextEncoder = wrap_block(_C.TextEncoder, "TextEncoder", "Bidirectional text encoder: "
                         "TextEncoder(vocab_size=512, max_len=64, d_model=128, depth=4, "
                         "num_heads=4, pool='mean', pad_id=0).")
# One class per registered Two-Leg fusion (vlmkit.GatedFusion(image_dim, text_dim, ...)),
# from the C++ registry: fusion_types() lists them.
fusion_types = _C.fusion_types
Fusion = _C.Fusion
_FUSIONS = slot_classes(fusion_types(), _C.make_fusion, ("image_dim", "text_dim"))
globals().update(_FUSIONS)
#: The registered Two-Leg fusions' config names, sorted.
FUSIONS = tuple(row["name"] for row in fusion_types())
# One class per registered Two-Leg head (vlmkit.ClassificationHead(in_dim, num_classes, ...)),
# from the C++ registry: head_types() lists them.
head_types = _C.head_types
Head = _C.Head
_HEADS = slot_classes(head_types(), _C.make_head, ("in_dim",))
globals().update(_HEADS)
#: The registered Two-Leg heads' config names (its "head" "type"), sorted.
HEADS = tuple(row["name"] for row in head_types())
#: The registered Two-Tower losses (its config's "loss"), with whether each learns a logit bias.
contrastive_loss_types = _C.contrastive_loss_types
CONTRASTIVE_LOSSES = tuple(row["name"] for row in contrastive_loss_types())
ClipLoss = wrap_block(_C.ClipLoss, "ClipLoss")
SigLipLoss = wrap_block(_C.SigLipLoss, "SigLipLoss")
ClassificationLoss = wrap_block(_C.ClassificationLoss, "ClassificationLoss")
MatchingLoss = wrap_block(_C.MatchingLoss, "MatchingLoss")
TextDecoder = wrap_block(_C.TextDecoder, "TextDecoder", "Causal pre-norm text decoder: "
                         "TextDecoder(vocab_size=264, max_len=256, d_model=128, depth=4, "
                         "pos_embedding='rotary', cross_attention_every=0, ...).")
# One class per registered projector (vlmkit.MlpProjector(in_dim, out_dim, ...)),
# built from the C++ registry: projector_types() lists them.
projector_types = _C.projector_types
Projector = _C.Projector
_PROJECTORS = slot_classes(projector_types(), _C.make_projector, ("in_dim", "out_dim"))
globals().update(_PROJECTORS)
#: The decoder fusions' config names (EncoderDecoder / EncoderTextDecoder "fusion").
DECODER_FUSIONS = tuple(_C.decoder_fusion_names())
#: The registered image and text encoders (config "type"), with their option defaults.
image_encoder_types = _C.image_encoder_types
text_encoder_types = _C.text_encoder_types
IMAGE_ENCODERS = tuple(row["name"] for row in image_encoder_types())
TEXT_ENCODERS = tuple(row["name"] for row in text_encoder_types())
#: The registered projectors' config names, sorted.
PROJECTORS = tuple(row["name"] for row in projector_types())
ByteTokenizer = _C.ByteTokenizer
DecoderOutput = _C.DecoderOutput
JsonSchemaMatcher = _C.JsonSchemaMatcher
box_to_text = _C.box_to_text
parse_boxes = _C.parse_boxes
parse_polygons = _C.parse_polygons

# Thread policy (vlmkit/runtime.h; docs/benchmarks.md has the numbers): one torch
# intra-op thread, OpenBLAS on every core. VLMKIT_TORCH_THREADS /
# VLMKIT_BLAS_THREADS override it; VLMKIT_KEEP_THREADS=1 leaves torch's as they are.
if _os.environ.get("VLMKIT_KEEP_THREADS", "") not in ("1", "true", "yes"):
    apply_default_threads()

# Heap policy (vlmkit/runtime.h; docs/benchmarks.md, "Page faults of a training
# step"): glibc keeps freed blocks below 32 MB and does not trim the heap, so a
# training step stops page-faulting its activations in every step.
# VLMKIT_MALLOC=system leaves the C library's defaults.
apply_default_allocator()

load_model = checkpoint.load_model
save_model = checkpoint.save_model

__all__ = [
    "ARCHITECTURES", "DECODER_FUSIONS", "FUSIONS", "IMAGE_ENCODERS", "TEXT_ENCODERS", "image_encoder_types", "text_encoder_types", "Fusion", "PROJECTORS", "FusedAdamW", "Trainer", "checkpoint", "export", "lora", "load_model", "save_model", "ByteTokenizer", "DecoderOutput", "EncoderDecoder", "EncoderTextDecoder",
    "JsonSchemaMatcher", "Projector", "TextDecoder", "box_to_text", "parse_boxes", "parse_polygons", "text", "ClassificationLoss", "ClipLoss", "CONTRASTIVE_LOSSES", "contrastive_loss_types",
    "HEADS", "Head", "head_types",
    "ConvStage", "CppModule", "EncoderOutput",
    "MatchingLoss", "MultiheadAttention", "SigLipLoss", "TextEncoder",
    "TransformerBlock", "TwoLeg", "TwoLegOutput", "TwoTower", "TwoTowerOutput", "ViT",
    "apply_default_allocator", "apply_default_threads", "attention_kernel", "build_model", "classification_loss", "clip_loss", "default_config",
    "fused_attention", "set_attention_kernel", "set_decode_kernel", "decode_kernel",
    "linear", "matmul", "set_gemm_kernel", "gemm_kernel", "have_dnnl_sgemm",
    "fused_gelu_mlp", "set_mlp_kernel", "mlp_kernel", "rms_norm", "group_norm_gelu", "rotary", "set_norm_kernel", "norm_kernel",
    "fusion_types", "matching_loss", "projector_types", "set_num_threads", "siglip_loss", "thread_info", "torch_version",
] + sorted(_PROJECTORS) + sorted(_FUSIONS) + sorted(_HEADS)
