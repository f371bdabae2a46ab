"""What every task starts from: the validated config, the compiled model and where things go."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from cnnrun.config import RunConfig, validate_run_config
from cnnrun.spec import CompiledModel, compile_model


@dataclass
class RunContext:
    cfg: RunConfig
    raw: Dict[str, Any]  # the resolved config as plain data (what gets logged)
    output_dir: Path
    model_source: str = "model"  # e.g. "conf/model/classic_cnn.yaml", for error messages
    overrides: List[str] = field(default_factory=list)
    _compiled: CompiledModel = None

    @classmethod
    def create(cls, raw: Dict[str, Any], output_dir: Path, sources: Dict[str, str], overrides: List[str]):
        cfg = validate_run_config(raw, sources.get("", "the config"))
        from cnnrun.backends import validate_options

        validate_options(cfg.framework.name, cfg.framework.options())
        ctx = cls(cfg, raw, output_dir, sources.get("model", "model"), overrides)
        ctx.compiled  # validate the spec now, before any data or framework loads
        return ctx

    @property
    def compiled(self) -> CompiledModel:
        if self._compiled is None:
            ds = self.cfg.dataset
            self._compiled = compile_model(self.cfg.model, ds.input_shape, ds.num_classes, self.model_source)
        return self._compiled

    @property
    def framework_options(self):
        from cnnrun.backends import validate_options

        return validate_options(self.cfg.framework.name, self.cfg.framework.options())

    def config_hash(self) -> str:
        """Identifies a resolved config (without tracking/output settings): used to skip finished sweep jobs."""
        relevant = {k: v for k, v in self.raw.items() if k not in ("tracking",)}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]
