"""The one writer of derived checkpoints: what every command that writes a checkpoint shares.

``fuse`` (streaming and in memory), ``merge-layers``, ``tune``, ``finetune`` and ``export`` describe
what they made as a :class:`DerivedCheckpoint`; :class:`DerivedWriter` (or :func:`write_derived`
for a model held in memory) writes it, in this order, into a staging directory beside the target
(mlpfuse/checkpoints/output.py) and renames it onto the target only when all of it is written and checked:

1. the weights: tensors streamed with :meth:`DerivedWriter.add` into safetensors shards as they
   come, or a model's ``save_pretrained``;
2. ``config.json``: the base architecture's config with the ``mlpfuse`` section (mlpfuse/checkpoints/format.py:
   ``model_type`` mlpfuse, ``auto_map``) and the shipped remote code, or the plain config of an
   exported checkpoint;
3. the tokenizer, then the side files carried from the source (generation config,
   sentence-transformers modules: :func:`mlpfuse.checkpoints.output.carry_side_files`);
4. the recipe (YAML, the settings that reproduce the output), the model card ``README.md``
   (mlpfuse/checkpoints/card.py) and any report file;
5. provenance: the section's ``version`` and ``packages`` (:func:`package_versions`) are stamped here;
6. the load check: :func:`mlpfuse.checkpoints.modeling.verify_checkpoint` (or the command's own ``check``,
   e.g. export's reload with plain transformers). A failure leaves nothing at the target.

Usage::

    with DerivedWriter(target, overwrite, max_shard_bytes, background=True) as out:
        for name, tensor in ...:
            out.add(name, tensor)
        files = out.close_tensors()
        out.commit(DerivedCheckpoint(source=source_dir, config=config, section=section, recipe=...))
    # here the checkpoint is complete at target

    write_derived(target, DerivedCheckpoint(source=source_dir, model=model, tokenizer=tokenizer), overwrite)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from mlpfuse import __version__
from mlpfuse.checkpoints.card import derived_card
from mlpfuse.checkpoints.format import SECTION, fused_config_dict, write_remote_code
from mlpfuse.checkpoints.output import carry_side_files, staging_directory
from mlpfuse.checkpoints.tensors import ShardedWriter, write_json

RECIPE_FILE = "mlpfuse_recipe.yaml"  # fuse's recipe (``mlpfuse fuse --config`` reads it back)
CARD_FILE = "README.md"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape the output, for provenance (the section's ``packages``)."""
    versions = {"mlpfuse": __version__}
    for name in ("torch", "transformers", "safetensors", "faiss-cpu", "faiss-gpu"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


@dataclass
class DerivedCheckpoint:
    """What a command writes, besides the tensors it streamed (see the module docstring for the order).

    ``source``: the checkpoint directory the output derives from (side files are carried from it).
    Weights: either tensors already streamed with :meth:`DerivedWriter.add`, with ``config`` the base
    architecture's config.json dict, or ``model``, an in-memory transformers model whose
    ``save_pretrained`` writes weights and config (``max_shard_bytes``: its largest shard); the
    writer drops its reference once the model is saved.
    ``section``: the ``mlpfuse`` section (a fused output: remote code is shipped and ``version`` and
    ``packages`` are stamped); None writes a plain checkpoint (a model's own section, if it has one,
    is still stamped). ``recipe``: dict written as YAML to ``recipe_file``; ``card``: README.md text, or
    ``summary`` (one sentence: what was done) for the generic card of :func:`mlpfuse.checkpoints.card.derived_card`;
    ``files``: other text files (name -> text). The load check is
    :func:`mlpfuse.checkpoints.modeling.verify_checkpoint` (outputs compared with ``reference`` when given),
    unless ``check`` (called with the staging directory) replaces it.
    """

    source: Path
    config: dict | None = None
    section: dict | None = None
    model: Any = None
    tokenizer: Any = None
    max_shard_bytes: int | None = None
    recipe: dict | None = None
    recipe_file: str = RECIPE_FILE
    card: str | None = None
    summary: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    reference: Any = None
    check: Callable[[Path], Any] | None = None


def stamped(section: dict) -> dict:
    """``section`` with this run's provenance: mlpfuse ``version`` and the ``packages`` versions."""
    return {**section, "version": __version__, "packages": package_versions()}


class DerivedWriter:
    """Stage a derived checkpoint for ``target``: stream tensors, then :meth:`commit` the rest.

    Entering claims the staging directory (:func:`mlpfuse.checkpoints.output.staging_directory`: the claim made
    before the work by ``claim_output``, or a new one); leaving without an error renames it onto
    ``target``, leaving with one removes it (a background shard writer is stopped first).
    ``max_shard_bytes``: open a :class:`~mlpfuse.checkpoints.tensors.ShardedWriter` for :meth:`add` (None:
    the weights come from a model in :meth:`commit`); ``background``: write shards in a thread.
    """

    def __init__(self, target: Path, overwrite: bool = False, max_shard_bytes: int | None = None,
                 background: bool = False):
        self.target, self.overwrite = target, overwrite
        self.max_shard_bytes, self.background = max_shard_bytes, background
        self.staging: Path | None = None
        self._shards: ShardedWriter | None = None
        self._files: list[str] | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "DerivedWriter":
        with contextlib.ExitStack() as stack:
            self.staging = stack.enter_context(staging_directory(self.target, self.overwrite))
            if self.max_shard_bytes is not None:
                self._shards = stack.enter_context(ShardedWriter(self.staging, self.max_shard_bytes, self.background))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, kind, value, traceback):
        return self._stack.__exit__(kind, value, traceback)

    def add(self, name: str, tensor) -> None:
        """Stream one tensor into the shards (checkpoint name ``name``)."""
        self._shards.add(name, tensor)

    def close_tensors(self) -> list[str]:
        """Finish the shards; returns the weight files written (shards and index)."""
        if self._files is None:
            self._files = self._shards.close() if self._shards is not None else []
        return self._files

    def commit(self, checkpoint: DerivedCheckpoint) -> Any:
        """Write everything but the streamed tensors, then run the load check; returns its result
        (the number of tensors compared, or what ``checkpoint.check`` returns). Raises what the
        load check raises (:class:`mlpfuse.checkpoints.modeling.UncleanCheckpoint`)."""
        staging = self.staging
        if checkpoint.model is not None:
            _save_model(checkpoint, staging)
            checkpoint.model = None  # memory: the load check loads the saved copy (``reference`` may hold the model)
        else:
            self.close_tensors()
            if checkpoint.section is None:
                write_json(staging / "config.json", checkpoint.config)
            else:
                write_json(staging / "config.json", fused_config_dict(checkpoint.config, stamped(checkpoint.section)))
                write_remote_code(staging)
        if checkpoint.tokenizer is not None:
            checkpoint.tokenizer.save_pretrained(staging)
        carry_side_files(checkpoint.source, staging)  # tokenizer, generation config, sentence-transformers modules
        if checkpoint.recipe is not None:
            (staging / checkpoint.recipe_file).write_text(yaml.safe_dump(checkpoint.recipe, sort_keys=True),
                                                          encoding="utf-8")
        card = checkpoint.card
        if card is None and checkpoint.summary is not None:
            card = derived_card(str(checkpoint.source), __version__, checkpoint.summary)
        if card is not None:
            (staging / CARD_FILE).write_text(card, encoding="utf-8")
        for name, text in checkpoint.files.items():
            (staging / name).write_text(text, encoding="utf-8")
        if checkpoint.check is not None:
            return checkpoint.check(staging)
        from mlpfuse.checkpoints.modeling import verify_checkpoint

        return verify_checkpoint(staging, reference=checkpoint.reference)


def _save_model(checkpoint: DerivedCheckpoint, staging: Path) -> None:
    """``save_pretrained`` of the checkpoint's model, its ``mlpfuse`` section set and stamped first."""
    config = checkpoint.model.config
    section = checkpoint.section if checkpoint.section is not None else getattr(config, SECTION, None)
    if section:
        setattr(config, SECTION, stamped(section))
    kwargs = {"max_shard_size": checkpoint.max_shard_bytes} if checkpoint.max_shard_bytes is not None else {}
    checkpoint.model.save_pretrained(staging, **kwargs)


def write_derived(target: Path, checkpoint: DerivedCheckpoint, overwrite: bool = False) -> Any:
    """Write ``checkpoint`` (weights from its ``model``) to ``target`` and check it; the output
    appears only when complete. Returns the load check's result (see :meth:`DerivedWriter.commit`)."""
    with DerivedWriter(target, overwrite) as out:
        result = out.commit(checkpoint)
    return result
