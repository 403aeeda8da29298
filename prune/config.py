"""`prune` stage schema."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from dsc.config import StageConfig, check_regexes


def _fraction(v: float) -> float:
    if not 0 <= v < 1:
        raise ValueError("must be in [0, 1)")
    return v


Fraction = Annotated[float, AfterValidator(_fraction)]


class PruneConfig(StageConfig):
    ratio: Fraction = Field(0.0, description="global: fraction of non-embedding parameters to remove, spread as one "
                                             "uniform fraction over `kinds` (instead of heads/channels/layers)")
    kinds: list[Literal["heads", "channels", "layers", "experts", "latent"]] = Field(
        default_factory=lambda: ["heads", "channels"], description="what a global `ratio` may cut")
    heads: Fraction = Field(0.0, description="fraction of query heads to remove (GQA-aware, same in every layer)")
    latent: Fraction = Field(0.0, description="MLA (DeepSeek): fraction of q_lora_rank and kv_lora_rank to remove "
                                              "(a smaller kv_lora_rank is a smaller KV cache); the latent norms "
                                              "are rescaled for the energy the removed channels carried")
    head_mode: Literal["per_group", "groups"] = Field(
        "per_group", description="per_group: the same number of query heads from every KV group; "
                                 "groups: whole KV groups (shrinks the KV cache too)")
    channels: Fraction = Field(0.0, description="fraction of MLP intermediate channels to remove (same in every layer): "
                                                "dense MLPs, and in a mixture of experts every routed and shared expert")
    channel_multiple: int = Field(1, gt=0, description="round the kept MLP width down to a multiple of this "
                                                       "(e.g. 128 for AWQ groups later)")
    layers: Fraction = Field(0.0, description="fraction of decoder layers to remove")
    experts: Fraction = Field(0.0, description="fraction of routed experts to remove from every MoE layer")
    expert_importance: Literal["reap", "reconstruction", "usage", "frequency", "random"] = Field(
        "reap", description="reap: router-weighted expert output norm on calibration data (REAP); reconstruction: "
                            "greedy, the expert whose removal changes the MoE block's output least goes first "
                            "(O(E²) block passes per layer on `reconstruction_tokens`); usage: routing weight "
                            "received; frequency: top-k count; random")
    sequential: bool = Field(True, description="score each MoE layer's experts with the earlier layers' cuts "
                                               "already made (one forward up to each MoE layer); false: one pass "
                                               "over the unpruned model. A global `ratio` always scores in one pass")
    reconstruction_tokens: int = Field(2048, gt=0, description="calibration tokens per MoE layer the "
                                                                "reconstruction importance measures on")
    expert_merge: Literal["drop", "merge"] = Field(
        "drop", description="drop: removed experts are gone (their tokens go to the next-best experts); merge: each "
                            "is averaged (by routing frequency) into the kept expert whose outputs are most similar")
    importance: Literal["activation", "taylor", "obs", "magnitude", "random"] = Field(
        "activation", description="width importance: activation (Wanda |W|·‖X‖ on calibration data), taylor "
                                  "(|W·∇W|, LLM-Pruner), obs (the output error a head's or channel's removal "
                                  "causes with the rest refit, greedy: OBS / SlimGPT), magnitude (weight norm), "
                                  "random (a baseline)")
    norm: Literal["l1", "l2"] = Field("l2", description="norm of the magnitude importance")
    layer_importance: Literal["block", "random"] = Field(
        "block", description="depth importance: block (1 − cos(input, output) of a layer, ShortGPT) or random")
    targets: list[str] = Field(default_factory=list, description="regexes over layer paths (model.layers.N) that "
                                                                 "may be removed by depth pruning; empty: all")
    ignore: list[str] = Field(default_factory=list, description="regexes over layer paths never removed")
    reconstruct: bool = Field(True, description="after the cut, refit every projection that read removed units "
                                                "(o_proj for heads, down_proj for MLP / shared-expert / routed-expert "
                                                "channels, q_b / kv_b for MLA latent ranks) by least squares on "
                                                "calibration data, layer by layer with the pruned layers before it "
                                                "propagated, so each layer's output matches the unpruned layer's "
                                                "(errors in plan.json; resumes per layer after a kill). On by default "
                                                "(it measured better on every model and cut tried); a run without "
                                                "data sources skips it with a note; false: the plain cut")
    reconstruct_depth: bool = Field(False, description="after removed layers, the next layer also refits its input "
                                                       "projections (q/k/v or MLA's q_a/kv_a, a dense MLP's gate/up) "
                                                       "to read what the unpruned model's layer read from the "
                                                       "unpruned model's stream, and its other refits target that "
                                                       "layer's output there")
    reconstruct_bias: bool = Field(False, description="the refit o_proj / down_proj also get an intercept (FLAP's "
                                                      "bias compensation); sets attention_bias / mlp_bias in the "
                                                      "config (Llama; attention only in Qwen3 and Qwen3-MoE)")
    reconstruct_damp: float = Field(0.01, ge=0, description="ridge of the refit (and of obs importance's inverse "
                                                            "Gram), times the mean input energy of the units")
    data: str | None = Field(None, description="calibration data source (default: the recipe's first)")
    split: Literal["calibration", "train", "eval", "all"] = Field("calibration", description="split to calibrate on")
    num_samples: int = Field(32, gt=0, description="calibration blocks")
    batch_size: int = Field(4, gt=0, description="calibration blocks per forward pass")
    seed: int = Field(0, ge=0, description="seed of the random importance")

    @field_validator("targets", "ignore")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        return check_regexes(v)

    @model_validator(mode="after")
    def _something_to_cut(self):
        per_kind = self.heads or self.channels or self.layers or self.experts or self.latent
        if self.ratio and per_kind:
            raise ValueError("set either a global `ratio` or per-kind heads/channels/layers, not both")
        if not (self.ratio or per_kind):
            raise ValueError("nothing to prune: set ratio, or heads, channels, layers, experts or latent above 0")
        if self.ratio and not self.kinds:
            raise ValueError("a global ratio needs at least one of kinds: heads, channels, layers, experts")
        if self.reconstruct_depth and not (self.layers or (self.ratio and "layers" in self.kinds)):
            raise ValueError("reconstruct_depth refits the layers after removed ones, and this cut removes no layers: "
                             "set layers (or add layers to kinds), or drop reconstruct_depth")
        changed = [k for k in ("reconstruct_depth", "reconstruct_bias") if getattr(self, k)]
        if changed and not self.reconstruct:
            raise ValueError(f"{changed[0]} shapes the least-squares refit, which reconstruct: false turns off: "
                             f"drop {changed[0]} or set reconstruct: true")
        if self.importance == "obs" and (self.latent or (self.ratio and "latent" in self.kinds)):
            raise ValueError("importance obs scores heads and MLP channels, not MLA latent ranks (no single "
                             "projection's error measures them): use importance activation or magnitude with latent")
        return self

    def per_kind(self, fraction: float, kinds: list[str] | None = None) -> "PruneConfig":
        """The per-kind config that cuts `fraction` of every kind in `kinds` (default: self.kinds);
        `ratio` stays set so the plan knows the cut is a global one."""
        return self.model_copy(update={k: fraction for k in (kinds if kinds is not None else self.kinds)})
