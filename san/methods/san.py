"""SAN (Synapse and Neuron; arXiv 2409.06706, ICML 2025).

Per-feature scales ("neurons") as in SSF, and each source's scale propagated,
parameter-free, into the input columns of the next weight ("synapses": W_next diag(s)).
The paper's text leaves choices open, so both readings are configurations of one method:

- `san` (reading A): SSF's scale and shift at SSF's positions, propagated along
  norm1->qkv, norm2->fc1, fc1->fc2 (across the activation) and the V slice of qkv->proj.
  Parameter count equals SSF's.
- `san_early` (reading B, the authors' early ViT code): scale-only vectors initialised to
  1 after patch_embed, qkv, proj, fc1, fc2; patch_embed's scale feeds every block's qkv,
  proj's feeds fc1 across the residual; LayerNorm affines train directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from san.methods.anatomy import ALL_POSITIONS, TARGETS, backbone_anatomy
from san.methods.base import AdaptedModel, MethodConfig, UnsupportedBackboneError
from san.methods.registry import register_method
from san.methods.scaling import ScaledInput, fold_all, place_scales, positions_on, scale_parameters
from san.methods.surgery import replace_module

# Presets name every edge of the reading; on a given architecture the edges whose
# positions it lacks are left out (ConvNeXt has no qkv, ViT no downsample_norm).
EDGE_PRESETS = {
    "reading_a": [
        "norm1->qkv",
        "norm2->fc1",
        "fc1->fc2",
        "qkv.v->proj",  # pre-norm transformer blocks
        "norm_dw->fc1",  # ConvNeXt block: norm -> fc1 (fc1->fc2 as above)
        "downsample_norm->reduction",  # Swin PatchMerging
        "downsample_norm->downsample_conv",  # ConvNeXt stage transition (conv input channels)
        "expand_bn->dw_conv",
        "dw_bn->project_conv",
    ],  # EfficientNet, across the ReLU6
    "reading_b": ["patch_embed->qkv", "proj->fc1", "fc1->fc2"],
    "none": [],
}
# Named position sets; like edge presets they are filtered to what an architecture has,
# while an explicit list must exist as written.
POSITION_PRESETS = {"all": list(ALL_POSITIONS), "reading_b": ["patch_embed", "qkv", "proj", "fc1", "fc2"]}
# source.part -> (start, stop) as fractions of the source width; qkv is [q | k | v].
SLICES = {"v": (2, 3)}
INFERENCE_MODES = ("both", "features_only", "weights_only")


@dataclass
class SANConfig(MethodConfig):
    positions: list[str] | str = field(
        default="all",
        metadata={
            "help": f"Outputs that get a scale vector: a preset ('all': SSF's positions on the "
            f"architecture; 'reading_b') or a list from {list(ALL_POSITIONS)}."
        },
    )
    shift: bool = field(default=True, metadata={"help": "Add a shift vector beside each scale (SSF's beta)."})
    init_std: float = field(
        default=0.02, metadata={"help": "Scales ~ N(1, std), shifts ~ N(0, std); 0 starts at the identity."}
    )
    edges: list[str] | str = field(
        default="reading_a",
        metadata={
            "help": f"Propagation edges 'source->target' (source may be 'qkv.v'), or a preset "
            f"name: {sorted(EDGE_PRESETS)}."
        },
    )
    qkv_to_proj: str = field(
        default="v_slice",
        metadata={
            "help": "How a qkv (3C) scale feeds proj (C): 'v_slice' (exact: attention commutes "
            "with per-channel scaling of V) or 'interpolate' (the early code's linear resize)."
        },
    )
    propagate_last_blocks: int | None = field(
        default=None, metadata={"help": "Propagate only in the last k blocks (None: all)."}
    )
    recalibrate: bool = field(
        default=False,
        metadata={"help": "A learnable vector (init 1) multiplying each propagated scale; adds parameters."},
    )
    propagate_into_head: bool = field(
        default=False, metadata={"help": "Also propagate the final norm's scale into the classifier."}
    )
    train_norm_affine: bool = field(
        default=False, metadata={"help": "Train LayerNorm weights and biases directly (reading B)."}
    )
    inference_mode: str = field(
        default="both",
        metadata={
            "help": f"Evaluation-time ablation: {list(INFERENCE_MODES)} (features = neuron scaling, "
            "weights = propagated synapse scaling)."
        },
    )

    def __post_init__(self):
        if isinstance(self.positions, str) and self.positions not in POSITION_PRESETS:
            raise ValueError(f"unknown position preset {self.positions!r}; accepted: {sorted(POSITION_PRESETS)}")
        unknown = sorted(set(self.position_list()) - set(ALL_POSITIONS))
        if unknown:
            raise ValueError(f"unknown SAN positions {unknown}; accepted: {list(ALL_POSITIONS)}")
        if isinstance(self.edges, str) and self.edges not in EDGE_PRESETS:
            raise ValueError(f"unknown edge preset {self.edges!r}; accepted: {sorted(EDGE_PRESETS)}")
        for edge in self.edge_list():
            source, _, target = edge.partition("->")
            source_position, _, part = source.partition(".")
            if source_position not in self.position_list() and not isinstance(self.edges, str):
                raise ValueError(
                    f"edge {edge!r}: source {source_position!r} has no scale; positions are {self.positions}"
                )
            if target not in TARGETS:
                raise ValueError(f"edge {edge!r}: target must be one of {list(TARGETS)}")
            if part and part not in SLICES:
                raise ValueError(f"edge {edge!r}: unknown slice {part!r}; accepted: {sorted(SLICES)}")
        if self.qkv_to_proj not in ("v_slice", "interpolate"):
            raise ValueError(f"qkv_to_proj must be 'v_slice' or 'interpolate', not {self.qkv_to_proj!r}")
        if self.inference_mode not in INFERENCE_MODES:
            raise ValueError(f"unknown inference_mode {self.inference_mode!r}; accepted: {list(INFERENCE_MODES)}")
        if self.propagate_into_head and "norm" not in self.position_list():
            raise ValueError("propagate_into_head needs a scale at the final 'norm' position")

    def position_list(self) -> list[str]:
        return list(POSITION_PRESETS[self.positions]) if isinstance(self.positions, str) else list(self.positions)

    def edge_list(self) -> list[str]:
        return list(EDGE_PRESETS[self.edges]) if isinstance(self.edges, str) else list(self.edges)


def _input_width(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


class SANModel(AdaptedModel):
    config_class = SANConfig

    def _adapt(self, model: nn.Module) -> None:
        cfg = self.config
        anatomy = backbone_anatomy(model, self.method_name)
        positions = positions_on(anatomy, cfg.position_list(), isinstance(cfg.positions, str), self.method_name)
        edges = self._edges_for(anatomy, positions)
        placed = place_scales(model, anatomy, positions, cfg.shift, cfg.init_std)
        self.scales = placed.all()
        self.propagations: list[ScaledInput] = []
        self.norm_affines: list[nn.Parameter] = []
        global_scales, block_scales, stage_scales = placed.global_scales, placed.block_scales, placed.stage_scales
        first_propagating = len(anatomy.blocks) - (cfg.propagate_last_blocks or len(anatomy.blocks))
        units = [
            (unit, scales)
            for index, (unit, scales) in enumerate(zip(anatomy.blocks, block_scales))
            if index >= first_propagating
        ]
        if cfg.propagate_last_blocks is None:
            units += list(zip(anatomy.stages, stage_scales))

        for unit, scales in units:
            sources: dict[str, list] = {}
            for edge in edges:
                source, _, target = edge.partition("->")
                position, _, part = source.partition(".")
                wrapper = global_scales.get(position) or scales.get(position)
                if wrapper is None or target not in unit:
                    continue
                width = wrapper.gamma.numel()
                interpolate = position == "qkv" and target == "proj" and cfg.qkv_to_proj == "interpolate"
                start, stop = 0, width
                if part and not interpolate:
                    low, high = SLICES[part]
                    start, stop = width * low // 3, width * high // 3
                if not interpolate and stop - start != _input_width(unit[target]):
                    continue  # e.g. reading B's patch_embed scale in a later Swin stage of another width
                sources.setdefault(target, []).append((wrapper, start, stop, interpolate))
            for target, target_sources in sources.items():
                self._propagate(model, unit[target], target_sources)

        if cfg.propagate_into_head:
            if "norm" not in global_scales:
                raise UnsupportedBackboneError(f"{self.method_name}: propagate_into_head needs a final norm scale")
            self._propagate(model, self.head, [(global_scales["norm"], 0, anatomy.head_input_dim, False)])
        if cfg.train_norm_affine:
            self.norm_affines = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
        self.set_inference_mode(cfg.inference_mode)

    def _edges_for(self, anatomy, positions: set[str]) -> list[str]:
        """The configured edges that exist here: presets are filtered, explicit lists checked."""
        kept, missing = [], []
        for edge in self.config.edge_list():
            source, _, target = edge.partition("->")
            source_position = source.partition(".")[0]
            if source_position in positions and target in anatomy.positions:
                kept.append(edge)
            else:
                missing.append(edge)
        if missing and not isinstance(self.config.edges, str):
            raise UnsupportedBackboneError(
                f"{self.method_name}: edge(s) {missing} need positions {anatomy.architecture} lacks or that have "
                f"no scale; positions with a scale: {sorted(positions)}"
            )
        return kept

    def _propagate(self, model: nn.Module, linear: nn.Linear, sources: list) -> None:
        propagated = ScaledInput(linear, sources, self.config.recalibrate)
        replace_module(model, linear, propagated)
        self.propagations.append(propagated)

    def set_inference_mode(self, mode: str) -> None:
        """The authors' inference ablation: both / features only / propagated weights only."""
        for wrapper in self.scales:
            wrapper.apply_feature_scale = mode in ("both", "features_only")
        for propagated in self.propagations:
            propagated.apply_propagation = mode in ("both", "weights_only")

    def set_train_mode(self, training: bool) -> None:
        super().set_train_mode(training)
        # The ablation switches are for evaluation; training always uses both.
        self.set_inference_mode("both" if training else self.config.inference_mode)

    def _method_parameters(self):
        yield from scale_parameters(self.scales)
        for propagated in self.propagations:
            if propagated.recalibration is not None:
                yield propagated.recalibration
        yield from self.norm_affines

    def _no_weight_decay_parameters(self):
        return self._method_parameters()

    def _merge_into(self, model: nn.Module) -> nn.Module:
        if self.config.inference_mode != "both":
            raise ValueError("merge folds both neuron and synapse scaling; set inference_mode='both' first")
        return fold_all(model)


@dataclass
class SANEarlyConfig(SANConfig):
    positions: list[str] | str = field(default="reading_b", metadata={"help": "Reading B's scale positions."})
    shift: bool = field(default=False, metadata={"help": "Reading B scales only."})
    init_std: float = field(default=0.0, metadata={"help": "Reading B initialises scales to exactly 1."})
    edges: list[str] | str = field(default="reading_b", metadata={"help": "Reading B's propagation edges."})
    train_norm_affine: bool = field(default=True, metadata={"help": "Reading B trains LayerNorm affines."})


class SANEarlyModel(SANModel):
    config_class = SANEarlyConfig


register_method("san", SANModel)
register_method("san_early", SANEarlyModel)
