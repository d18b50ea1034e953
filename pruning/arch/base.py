"""Architecture adapters as data, and everything derived from them once, for every family alike.

A `Family` only says where things are in a decoder block: the attention's q/k/v/o linears, the FFN's
producer and consumer linears, which config fields hold the FFN width and KV-head count, which output
linears carry a bias in the stock architecture, which per-head norms sit on Q/K. `ArchAdapter` derives
the rest: the couplings (units removable together), unit costs, per-layer shapes, stock and project
configs, and the project architecture.

A *coupling* is a set of units (an FFN neuron, a V dimension in every KV head, a whole KV head with its
query heads) that can be removed together without touching anything else: each unit owns some rows of
each producer linear and some input columns of one consumer linear.

The project architecture of a family is its stock class with per-layer linears (FFN width, KV-head
count, V width, output biases read from the config's per-layer lists) and the stock forward code
unchanged. V narrower than Q/K is zero-padded back to the head size after `v_proj` and sliced back
before `o_proj`, so every family's own attention code (rotary, Q/K norms, sliding windows, soft-capping,
caches) runs as is; the weights stay narrow. A layer with no KV heads left keeps only its output
linear (its bias is the attention output).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Family:
    """Where things are in one family's decoder block. Paths are relative to a block."""

    name: str
    model_types: tuple[str, ...]  # the stock config's model_type(s)
    stock_model: type[PreTrainedModel]  # the stock causal-LM class, kept where shapes stay stock
    layers: str = "model.layers"  # the ModuleList of decoder blocks, relative to the causal LM
    attention: str = "self_attn"
    q_proj: str = "q_proj"  # q/k/v/o are relative to the attention module
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    ffn_producers: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    ffn_consumer: str = "mlp.down_proj"
    ffn_width_key: str = "intermediate_size"
    kv_heads_key: str | None = "num_key_value_heads"  # None: multi-head attention (one KV head per query head)
    # config flags of the stock output biases (None: never); a compensated model may add them
    attn_output_bias_key: str | None = "attention_bias"
    ffn_output_bias_key: str | None = "mlp_bias"
    # per-head norms over head_dim shared by all heads (Qwen3, Gemma-3): whole Q/K heads stay valid
    qk_norms: tuple[str, ...] = ()
    # attention attributes that hold the query-head count and must follow it per layer (OPT's num_heads)
    head_count_attrs: tuple[str, ...] = ()
    # (consumer, norm): a norm between a consumer's output and the residual add (Gemma-3's post-attention and
    # post-FFN norms), which rescales what the consumer adds to the residual stream token by token
    output_norms: tuple[tuple[str, str], ...] = ()

    @property
    def project_model_type(self) -> str:
        return f"pruned_{self.model_types[0]}"

    def attn(self, leaf: str) -> str:
        return f"{self.attention}.{leaf}"


@dataclass(frozen=True)
class Coupling:
    """Units removable together. Index tensors are relative to one decoder layer."""

    name: str  # "mlp" or "attn"
    producers: dict[str, torch.Tensor]  # module path -> LongTensor [units, rows_per_unit]
    consumer: str  # module path of the linear whose input columns are cut
    columns: torch.Tensor  # LongTensor [units, columns_per_unit] of consumer input columns
    groups: int = 1  # units form `groups` equal contiguous blocks that must keep equal counts
    unit: str = "neuron"  # what one unit is: "neuron" (FFN), "v_dim" (one V dimension per KV head), "kv_head"

    @property
    def num_units(self) -> int:
        return self.columns.shape[0]

    def unit_cost(self, layer: nn.Module) -> int:
        """Weight parameters removed with one unit (biases are not prunable parameters)."""
        cost = 0
        for path, rows in self.producers.items():
            cost += rows.shape[1] * layer.get_submodule(path).in_features
        return cost + self.columns.shape[1] * layer.get_submodule(self.consumer).out_features


@dataclass(frozen=True)
class LayerShape:
    """The per-layer widths a checkpoint must record to be rebuilt."""

    ffn_width: int
    kv_heads: int
    v_head_dim: int
    attn_output_bias: bool
    ffn_output_bias: bool


PROJECT_CONFIG_KEYS = ("ffn_widths", "kv_heads", "v_head_dims", "attn_output_bias", "ffn_output_bias")


def config_head_dim(config: PretrainedConfig) -> int:
    """The attention head size a config gives: `head_dim` where it has one, else hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class ArchAdapter:
    """One family, bound to one model's config (head size and query heads per KV head)."""

    def __init__(self, family: Family, config: PretrainedConfig):
        self.family = family
        self.head_dim = config_head_dim(config)
        kv = getattr(config, family.kv_heads_key) if family.kv_heads_key else None
        self.groups = config.num_attention_heads // (kv or config.num_attention_heads)

    # --- where things live -------------------------------------------------------------------
    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_submodule(self.family.layers)

    def attention_paths(self) -> tuple[str, str, str, str]:
        f = self.family
        return f.attn(f.q_proj), f.attn(f.k_proj), f.attn(f.v_proj), f.attn(f.o_proj)

    def prunable_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Attention + MLP linears of one block: the denominator of sparsity."""
        f = self.family
        paths = [*self.attention_paths(), *f.ffn_producers, f.ffn_consumer]
        return [layer.get_submodule(p) for p in paths if _has(layer, p)]

    def attention_dims(self, layer: nn.Module) -> tuple[int, int]:
        """(KV heads, V width per head) of one layer, read from its linears."""
        _, k, v, _ = self.attention_paths()
        if not _has(layer, k):
            return 0, 0
        n_kv = layer.get_submodule(k).out_features // self.head_dim
        return n_kv, (layer.get_submodule(v).out_features // n_kv if n_kv else 0)

    # --- couplings, derived ----------------------------------------------------------------------
    def couplings(self, layer: nn.Module, attention_unit: str) -> list[Coupling]:
        """`attention_unit` is "channel" (one V dimension in every KV head) or "head" (a KV group).

        With GQA, V row (h, d) of KV head h feeds the O column of dimension d of every query head in
        h's group: query head h*g + j reads KV head h (transformers' `repeat_kv` order).
        """
        if attention_unit not in ("channel", "head"):
            raise ValueError(f"unknown attention unit {attention_unit!r}")
        f = self.family
        width = layer.get_submodule(f.ffn_producers[0]).out_features
        neurons = torch.arange(width)[:, None]
        mlp = Coupling("mlp", dict.fromkeys(f.ffn_producers, neurons), f.ffn_consumer, neurons)
        n_kv, dv = self.attention_dims(layer)
        if n_kv * dv == 0:
            return [mlp]
        g, hd = self.groups, self.head_dim
        q, k, v, o = self.attention_paths()
        heads, members, dims = torch.arange(n_kv), torch.arange(g), torch.arange(dv)
        # o_proj column of (kv head h, query j in its group, V dimension d)
        o_cols = (heads[:, None, None] * g + members[None, :, None]) * dv + dims[None, None, :]
        if attention_unit == "channel":
            units = torch.arange(n_kv * dv)[:, None]
            columns = o_cols.permute(0, 2, 1).reshape(n_kv * dv, g)
            attn = Coupling("attn", {v: units}, o, columns, groups=n_kv, unit="v_dim")
        else:
            q_rows = (heads[:, None] * g + members[None, :])[:, :, None] * hd + torch.arange(hd)
            k_rows = heads[:, None] * hd + torch.arange(hd)
            v_rows = heads[:, None] * dv + dims
            attn = Coupling("attn", {q: q_rows.reshape(n_kv, -1), k: k_rows, v: v_rows}, o, o_cols.reshape(n_kv, -1),
                            unit="kv_head")
        return [attn, mlp]

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        f = self.family
        n_kv, dv = self.attention_dims(layer)
        return LayerShape(
            ffn_width=layer.get_submodule(f.ffn_producers[0]).out_features,
            kv_heads=n_kv,
            v_head_dim=dv if n_kv else self.head_dim,
            attn_output_bias=layer.get_submodule(f.attn(f.o_proj)).bias is not None,
            ffn_output_bias=layer.get_submodule(f.ffn_consumer).bias is not None,
        )

    def stock_shape(self, config: PretrainedConfig) -> LayerShape:
        f = self.family
        kv = getattr(config, f.kv_heads_key) if f.kv_heads_key else None
        return LayerShape(getattr(config, f.ffn_width_key), kv or config.num_attention_heads, self.head_dim,
                          _flag(config, f.attn_output_bias_key), _flag(config, f.ffn_output_bias_key))

    def config_shapes(self, config: PretrainedConfig) -> list[LayerShape]:
        """Every layer's shape as a config records it: the project architecture's per-layer lists, or the stock
        shape in every layer."""
        if getattr(config, "ffn_widths", None) is None:
            return [self.stock_shape(config)] * config.num_hidden_layers
        return [LayerShape(ffn, n_kv, dv, bool(config.attn_output_bias), bool(config.ffn_output_bias))
                for ffn, n_kv, dv in zip(config.ffn_widths, config.kv_heads, config.v_head_dims, strict=True)]

    # --- the module types follow the linears' shapes ------------------------------------------------
    def conform(self, layer: nn.Module) -> None:
        """Make one block's modules agree with its linears' shapes after a cut: narrow-V padding, the
        query-head count attributes, and an empty attention where no KV head is left."""
        f = self.family
        _, _, v_path, o_path = self.attention_paths()
        attention = layer.get_submodule(f.attention)
        n_kv, dv = self.attention_dims(layer)
        if n_kv == 0:
            if not isinstance(attention, EmptyAttention):
                empty = EmptyAttention(f.o_proj, layer.get_submodule(o_path), getattr(attention, "layer_idx", None),
                                       self.head_dim)
                _replace(layer, f.attention, empty)
            return
        for attr in f.head_count_attrs:
            setattr(attention, attr, n_kv * self.groups)
        narrow = dv != self.head_dim
        v, o = layer.get_submodule(v_path), layer.get_submodule(o_path)
        v.__class__ = PaddedHeadsLinear if narrow else nn.Linear
        o.__class__ = NarrowHeadsLinear if narrow else nn.Linear
        if narrow:
            v.heads, v.width, v.head_dim = n_kv, dv, self.head_dim
            o.heads, o.width, o.head_dim = n_kv * self.groups, dv, self.head_dim

    def build_layers(self, model: PreTrainedModel, config: PretrainedConfig) -> None:
        """Give a freshly built stock skeleton the per-layer linears that `config`'s lists record."""
        f = self.family
        q, k, v, o = self.attention_paths()
        for i, layer in enumerate(self.layers(model)):
            n_kv, dv, ffn = config.kv_heads[i], config.v_head_dims[i], config.ffn_widths[i]
            rows = {q: n_kv * self.groups * self.head_dim, k: n_kv * self.head_dim, v: n_kv * dv,
                    **dict.fromkeys(f.ffn_producers, ffn)}
            for path, out_features in rows.items():
                _replace(layer, path, _resized(layer.get_submodule(path), out_features=out_features))
            _replace(layer, o, _resized(layer.get_submodule(o), in_features=n_kv * self.groups * dv,
                                        add_bias=config.attn_output_bias))
            _replace(layer, f.ffn_consumer, _resized(layer.get_submodule(f.ffn_consumer), in_features=ffn,
                                                     add_bias=config.ffn_output_bias))
            self.conform(layer)

    # --- conversions between the stock and the project architecture ------------------------------
    def stock_config(self, config: PretrainedConfig, shape: LayerShape) -> PretrainedConfig:
        """A stock config whose every layer has `shape` (which `is_stock_compatible` allowed)."""
        fields = _plain_fields(config)
        fields[self.family.ffn_width_key] = shape.ffn_width
        return self.family.stock_model.config_class(**fields)

    def project_config(self, config: PretrainedConfig, shapes: list[LayerShape]) -> PretrainedConfig:
        fields = _plain_fields(config)
        fields.update(
            ffn_widths=[s.ffn_width for s in shapes],
            kv_heads=[s.kv_heads for s in shapes],
            v_head_dims=[s.v_head_dim for s in shapes],
            attn_output_bias=any(s.attn_output_bias for s in shapes),
            ffn_output_bias=any(s.ffn_output_bias for s in shapes),
        )
        return project_classes(self.family)[1].config_class(**fields)

    def is_stock_compatible(self, config: PretrainedConfig, shapes: list[LayerShape]) -> bool:
        stock = self.stock_shape(config)
        first = shapes[0]
        return all(s == first for s in shapes) and (
            first.kv_heads, first.v_head_dim, first.attn_output_bias, first.ffn_output_bias,
        ) == (stock.kv_heads, stock.v_head_dim, stock.attn_output_bias, stock.ffn_output_bias)

    def to_project(self, model: PreTrainedModel) -> PreTrainedModel:
        """The same weights in the project architecture, whose modules follow their linears' shapes."""
        project_cls = project_classes(self.family)[1]
        if isinstance(model, project_cls):
            return model
        shapes = [self.layer_shape(layer) for layer in self.layers(model)]
        return rebuild(model, project_cls, self.project_config(model.config, shapes))

    def finalize(self, model: PreTrainedModel) -> PreTrainedModel:
        """After surgery: the stock class where every layer kept stock shapes, else the project one.

        An output bias added to some layers (compensation) is added, as zeros, to all, since the
        project config records output biases per model, not per layer.
        """
        f = self.family
        layers = self.layers(model)
        for layer in layers:
            self.conform(layer)
        for path in (f.attn(f.o_proj), f.ffn_consumer):
            if any(layer.get_submodule(path).bias is not None for layer in layers):
                for layer in layers:
                    add_zero_bias(layer.get_submodule(path))
        shapes = [self.layer_shape(layer) for layer in layers]
        base = model.config
        if self.is_stock_compatible(base, shapes):
            return rebuild(model, f.stock_model, self.stock_config(base, shapes[0]))
        return rebuild(model, project_classes(f)[1], self.project_config(base, shapes))


# --- modules of the project architecture --------------------------------------------------------------
class PaddedHeadsLinear(nn.Linear):
    """`v_proj` of a layer whose V heads are narrower than Q/K: the output is zero-padded per head to
    the head size, so the family's attention code sees stock-shaped V (the padding attends to zeros)."""

    heads: int
    width: int
    head_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        padded = F.pad(out.unflatten(-1, (self.heads, self.width)), (0, self.head_dim - self.width))
        return padded.flatten(-2)


class NarrowHeadsLinear(nn.Linear):
    """`o_proj` of a narrow-V layer: keeps each head's first `width` dimensions (the real V ones)."""

    heads: int
    width: int
    head_dim: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        narrow = x.unflatten(-1, (self.heads, self.head_dim))[..., : self.width]
        return super().forward(narrow.flatten(-2))


class EmptyAttention(nn.Module):
    """A layer with every head pruned: its output is the output linear's bias (zero without one).

    The KV cache is still updated (with zero heads) so that it keeps counting the tokens it has seen.
    """

    def __init__(self, output_name: str, output: nn.Linear, layer_idx: int | None, head_dim: int):
        super().__init__()
        self.output_name, self.layer_idx, self.head_dim = output_name, layer_idx, head_dim
        setattr(self, output_name, output)

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        if past_key_values is not None and self.layer_idx is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        output = getattr(self, self.output_name)
        return output(hidden_states.new_zeros(*hidden_states.shape[:-1], 0)), None


_PROJECT_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {}


def project_classes(family: Family) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    """(config class, causal-LM class) of a family's project architecture, made once per family:
    `Pruned<StockConfig>` with model_type `pruned_<model_type>`, and `Pruned<StockModel>`."""
    if family.name not in _PROJECT_CLASSES:
        stock, stock_config = family.stock_model, family.stock_model.config_class
        config_cls = type(f"Pruned{stock_config.__name__}", (stock_config,),
                          {"model_type": family.project_model_type, "__module__": __name__})

        def __init__(self, config):
            stock.__init__(self, config)
            ArchAdapter(family, config).build_layers(self, config)
            self.post_init()

        model_cls = type(f"Pruned{stock.__name__}", (stock,),
                         {"config_class": config_cls, "__init__": __init__, "__module__": __name__})
        _PROJECT_CLASSES[family.name] = config_cls, model_cls
        for cls in (config_cls, model_cls):  # importable by name, so pickling (vLLM's spawned processes) works
            globals()[cls.__name__] = cls
    return _PROJECT_CLASSES[family.name]


# --- helpers ---------------------------------------------------------------------------------------------
def _flag(config: PretrainedConfig, key: str | None) -> bool:
    return bool(getattr(config, key, False)) if key else False


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None,
             add_bias: bool = False) -> nn.Linear:
    """A fresh linear of the new size, on the old one's device and dtype, keeping its bias (or adding one)."""
    w = linear.weight
    return nn.Linear(linear.in_features if in_features is None else in_features,
                     linear.out_features if out_features is None else out_features,
                     bias=linear.bias is not None or add_bias, device=w.device, dtype=w.dtype)


def _plain_fields(config: PretrainedConfig) -> dict:
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "quantization_config", "dtype",
                "_model_name_or_path", *PROJECT_CONFIG_KEYS):
        fields.pop(key, None)
    return fields


def add_zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        weight = linear.weight
        linear.bias = nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=weight.requires_grad)


def rebuild(model: PreTrainedModel, cls: type[PreTrainedModel], config: PretrainedConfig) -> PreTrainedModel:
    """Re-home `model`'s tensors in a `cls` skeleton built on the meta device: no copy, no re-init."""
    config = copy.deepcopy(config)
    config._attn_implementation = model.config._attn_implementation
    config.dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        new = cls(config)
    new.load_state_dict(model.state_dict(), strict=True, assign=True)
    # Non-persistent buffers (rotary frequencies, embedding scales) are not in the state dict.
    old_buffers = dict(model.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            new.get_submodule(owner).register_buffer(leaf, old_buffers[name], persistent=False)
    new.tie_weights()
    new.generation_config = model.generation_config
    new.eval()
    return new
