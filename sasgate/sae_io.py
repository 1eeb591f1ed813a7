"""SAE sourcing: one SAE per required tuple, every one loaded through sae-lens, safetensors only.

A tuple's `sae` spec (params.yaml) says where its SAE comes from:

* `train`: trained here with sae-lens's own `SAETrainer` on the model's activations at the
  tuple's hook over the toy training corpus (the grammar's *train* pairs, disjoint from the
  eval and selection splits by construction; BOS and pad positions excluded). Seeded
  initialisation, a seeded fixed batch order, no wandb, no timestamps: the saved files
  are byte-identical across runs with the same params on the same machine.
* `sae_lens:RELEASE/SAE_ID@REV`: a release of the installed sae-lens registry, pinned to a
  Hub commit. `SAE.from_pretrained` has no revision argument (it takes the Hub's `main`), so
  sae-lens's own converter for the release runs with its Hub access pinned: every file it
  asks for is fetched with `hf_hub_download(..., revision=REV)`, pickle formats are refused
  before anything is downloaded, and `torch.load` is disabled while it runs.
* `hf:OWNER/REPO/PATH@REV`: a folder in sae-lens disk format (cfg.json +
  sae_weights.safetensors) in a Hub repo at a pinned commit, loaded with `SAE.load_from_disk`.
* `path:DIR`: a local folder in sae-lens disk format (relative paths are from the project root).

Each tuple's output folder artifacts/saes/<tuple_key>/ holds the SAE in sae-lens disk format
(cfg.json with sorted keys, sae_weights.safetensors), so later stages load every SAE the
same way (`load_tuple_sae`), plus source.json: the spec, revision, sha256 of every source
file, d_in / d_sae / architecture / hook name, and the checks against the tuple.
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from .artifacts import atomic_write_json, canonical_json, is_pickle_name, read_json, sha256_file
from .errors import ArtifactError, ParamsError
from .model_names import same_model
from .params import LOCAL_MODEL, TOY_MODEL, Params, SaeTrainParams, TupleParams
from .paths import Paths

if TYPE_CHECKING:  # sae-lens takes seconds to import; only the functions that need it import it
    from sae_lens import SAE

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SOURCE_FILE = "source.json"
SOURCE_SCHEMA = "sasgate.sae_source/1"
ACTIVATION_BATCH = 64  # sequences per forward pass when collecting training activations
CORPUS_DATASET = "sasgate:toy-refusal/train-pairs"
LOCAL_CORPUS_DATASET = "sasgate:synthetic-instructions/own-answers"  # local models (local_training_corpus)
# Training recipe constants (not params: changing them changes what `train` means; see sae-lens docs).
LR_DECAY_FRACTION = 0.2  # linear decay to 0 over the last 20% of steps (sae-lens's recommended schedule)
DEAD_WINDOW_FRACTION = 0.25  # a latent that fired in none of the last 25% of steps counts as dead
NORM_ESTIMATE_BATCHES = 8  # batches used by sae-lens to estimate the activation norm scaling factor
EVAL_BATCH = 4096  # tokens per SAE forward when measuring a trained SAE


def _quiet_sae_lens() -> None:
    """sae-lens logs and warns about things that do not apply here (wandb, model kwargs)."""
    import logging

    logging.getLogger("sae_lens").setLevel(logging.ERROR)


# --------------------------------------------------------------------------- disk format


def refuse_pickles(folder: Path) -> None:
    """ArtifactError if any file under `folder` is a pickle format (DESIGN rule 5)."""
    bad = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and is_pickle_name(p.name))
    if bad:
        raise ArtifactError(
            f"{folder} holds pickle file(s) {bad}; sasgate never loads pickles. Convert the SAE to sae-lens "
            f"disk format ({SAE_CFG} + {SAE_WEIGHTS}) and remove the pickle files."
        )


def load_sae_dir(folder: str | Path, device: str = "cpu") -> "SAE":
    """An SAE from a folder in sae-lens disk format, via `SAE.load_from_disk`; errors are ArtifactErrors."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"missing SAE folder {folder}")
    refuse_pickles(folder)
    cfg_path, weights_path = folder / SAE_CFG, folder / SAE_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise ArtifactError(f"{folder} is not in sae-lens disk format: {p.name} is missing")
    cfg = read_json(cfg_path)  # ArtifactError on corrupt JSON
    if not isinstance(cfg, dict) or "architecture" not in cfg or "d_in" not in cfg or "d_sae" not in cfg:
        raise ArtifactError(f"corrupt SAE config {cfg_path}: expected an object with architecture, d_in, d_sae")
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            for k in fh.keys():  # reading each tensor catches truncation as well as a bad header
                fh.get_tensor(k)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"corrupt SAE weights {weights_path}: {type(exc).__name__}: {exc}") from None
    _quiet_sae_lens()
    from sae_lens import SAE

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return SAE.load_from_disk(str(folder), device=device)
    except Exception as exc:
        raise ArtifactError(f"cannot load the SAE in {folder} with sae-lens: {type(exc).__name__}: {exc}") from None


def save_sae(sae: "SAE", folder: Path) -> dict[str, str]:
    """Save in sae-lens disk format (`save_model`; `save_inference_model` for a TrainingSAE), on CPU,
    then rewrite cfg.json as canonical JSON. Returns {file name: "sha256:..."}."""
    from sae_lens import TrainingSAE

    sae = sae.to("cpu")
    with torch.no_grad():
        for p in sae.parameters():  # safetensors needs contiguous tensors (some converters transpose)
            p.data = p.data.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(sae, TrainingSAE):
        sae.save_inference_model(str(folder))
    else:
        sae.save_model(str(folder))
    cfg_path = folder / SAE_CFG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["device"] = "cpu"
    cfg_path.write_text(canonical_json(cfg), encoding="utf-8")
    for name in (SAE_CFG, SAE_WEIGHTS):
        (folder / name).chmod(0o644)  # safetensors writes 0600; artifacts are world-readable like the others
    return {name: "sha256:" + sha256_file(folder / name) for name in (SAE_CFG, SAE_WEIGHTS)}


def sae_files(paths: Paths, tuple_key: str) -> list[Path]:
    """The files that define a tuple's SAE (what a gate lists in its inputs)."""
    d = paths.sae_dir(tuple_key)
    return [d / SAE_CFG, d / SAE_WEIGHTS]


def read_source(folder: Path) -> dict[str, Any]:
    rec = read_json(folder / SOURCE_FILE)
    if not isinstance(rec, dict) or rec.get("schema") != SOURCE_SCHEMA:
        raise ArtifactError(f"{folder / SOURCE_FILE}: not a {SOURCE_SCHEMA} record")
    return rec


def load_tuple_sae(paths: Paths, tp: TupleParams, device: str = "cpu") -> tuple["SAE", dict[str, Any]]:
    """The SAE the `saes` stage sourced for a tuple, and its source.json; refuses a stale folder."""
    folder = paths.sae_dir(tp.key)
    if not folder.is_dir():
        raise ArtifactError(f"missing SAE folder {paths.rel(folder)} (run the `saes` stage: `dvc repro saes`)")
    src = read_source(folder)
    if src.get("spec") != tp.sae or src.get("tuple", {}).get("hook_name") != tp.hook_name:
        raise ArtifactError(
            f"{paths.rel(folder)} was sourced for {src.get('tuple', {}).get('hook_name')} from {src.get('spec')!r}, "
            f"but params ask for {tp.hook_name} from {tp.sae!r}; rerun the `saes` stage"
        )
    for name, digest in src.get("files", {}).items():
        f = folder / name
        if not f.is_file() or "sha256:" + sha256_file(f) != digest:
            raise ArtifactError(f"{paths.rel(f)} does not match the sha256 recorded in {SOURCE_FILE}; rerun `saes`")
    return load_sae_dir(folder, device=device), src


# --------------------------------------------------------------------------- checks


def _hook_match(sae_hook: str | None, tp: TupleParams) -> str:
    """'exact', 'equivalent' (resid_pre[l] = resid_post[l-1]), or 'unknown' (the SAE names no hook)."""
    if not sae_hook:
        return "unknown"
    if sae_hook == tp.hook_name:
        return "exact"
    if tp.site == "resid_pre" and tp.layer > 0 and sae_hook == f"blocks.{tp.layer - 1}.hook_resid_post":
        return "equivalent"
    if tp.site == "resid_post" and sae_hook == f"blocks.{tp.layer + 1}.hook_resid_pre":
        return "equivalent"
    return "mismatch"


def check_sae_fits(sae: "SAE", tp: TupleParams, d_model: int, model_name: str) -> dict[str, Any]:
    """d_in must equal the model's d_model and the SAE's hook must be the tuple's; returns the checks."""
    d_in = int(sae.cfg.d_in)
    if d_in != d_model:
        raise ParamsError(
            f"tuples {tp.key}: SAE {tp.sae!r} has d_in = {d_in}, but model {model_name} has d_model = {d_model}"
        )
    sae_hook = sae.cfg.metadata.hook_name
    match = _hook_match(sae_hook, tp)
    if match == "mismatch":
        raise ParamsError(
            f"tuples {tp.key}: SAE {tp.sae!r} was trained on hook {sae_hook}, but the tuple reads {tp.hook_name} "
            "(transformer-lens names; resid_pre[l] = resid_post[l-1] is accepted as equivalent)"
        )
    sae_model = sae.cfg.metadata.model_name
    return {
        "d_model": d_model,
        "d_in_equals_d_model": True,
        "hook_match": match,
        "sae_hook_name": sae_hook,
        "sae_model_name": sae_model,
        # e.g. a Gemma Scope SAE trained on gemma-2-2b applied to gemma-2-2b-it: allowed, but on record
        # (one model identity rule: transformer-lens aliases, owner included; sasgate.model_names)
        "model_match": None if not sae_model else same_model(str(sae_model), model_name),
    }


def _describe_sae(sae: "SAE") -> dict[str, Any]:
    return {
        "architecture": sae.cfg.architecture(),
        "d_in": int(sae.cfg.d_in),
        "d_sae": int(sae.cfg.d_sae),
        "dtype": str(sae.cfg.dtype),
        "hook_name": sae.cfg.metadata.hook_name,
        "model_name": sae.cfg.metadata.model_name,
    }


# --------------------------------------------------------------------------- pinned Hub access


@dataclass
class _PinnedHub:
    """Stand-in for sae-lens's Hub access while one of its converters runs: everything at one commit."""

    revision: str
    fetched: dict[str, Path] = field(default_factory=dict)  # repo-relative path -> local file
    failures: list[str] = field(default_factory=list)

    def download(self, repo_id: str, filename: str, *args: Any, subfolder: str | None = None, **_kw: Any) -> str:
        from huggingface_hub import hf_hub_download

        if args:  # sae-lens passes everything by keyword except (repo_id, filename)
            raise TypeError(f"unexpected positional arguments to hf_hub_download: {args}")
        full = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
        if is_pickle_name(full):
            raise ArtifactError(
                f"{repo_id}/{full} is a pickle format; sasgate refuses to download or load pickles "
                "(DESIGN rule 5). Choose an SAE published as safetensors or npz."
            )
        try:
            local = hf_hub_download(repo_id=repo_id, filename=full, revision=self.revision)
        except Exception as exc:
            # re-raised as is: sae-lens treats EntryNotFoundError as "optional file absent" (sparsity.safetensors)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.failures.append(f"{full}: {type(exc).__name__}: {first}")
            raise
        self.fetched[full] = Path(local)
        return local

    def tensor_shapes(self, repo_id: str, filename: str) -> dict[str, list[int]]:
        """Replaces sae-lens's HTTP range read of a safetensors header (which ignores revisions)."""
        from safetensors import safe_open

        local = self.download(repo_id, filename)
        with safe_open(local, framework="pt") as fh:
            return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}

    def source_files(self) -> dict[str, str]:
        return {name: "sha256:" + sha256_file(p) for name, p in sorted(self.fetched.items())}


def _no_torch_load(*_a: Any, **_kw: Any) -> Any:
    raise ArtifactError("this SAE's sae-lens converter calls torch.load (a pickle); sasgate refuses pickles")


@contextlib.contextmanager
def pinned_hub(revision: str) -> Iterator[_PinnedHub]:
    """While active, sae-lens's loaders fetch every file at `revision` and cannot unpickle anything."""
    from sae_lens.loading import pretrained_sae_loaders as loaders

    hub = _PinnedHub(revision)
    saved = {name: getattr(loaders, name) for name in ("hf_hub_download", "get_safetensors_tensor_shapes")}
    saved_load = torch.load
    loaders.hf_hub_download = hub.download  # type: ignore[assignment]
    loaders.get_safetensors_tensor_shapes = hub.tensor_shapes  # type: ignore[assignment]
    torch.load = _no_torch_load  # type: ignore[assignment]
    try:
        yield hub
    finally:
        for name, fn in saved.items():
            setattr(loaders, name, fn)
        torch.load = saved_load  # type: ignore[assignment]


def _fetch_error(what: str, hub: _PinnedHub, exc: Exception) -> ArtifactError:
    tried = "; ".join(hub.failures) if hub.failures else "no file was fetched"
    return ArtifactError(
        f"cannot load SAE {what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        f" (downloads: {tried}). Is the Hub reachable, or are the files in the local Hugging Face cache "
        "(HF_HUB_OFFLINE=1 allows no download), and is the revision right?"
    )


def fetch_sae_lens(release: str, sae_id: str, revision: str, device: str = "cpu") -> tuple["SAE", dict[str, Any]]:
    """A registry SAE at a pinned commit, through sae-lens's converter for that release."""
    _quiet_sae_lens()
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import get_conversion_loader_name
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise ParamsError(f"sae-lens release {release!r} is not in the installed sae-lens registry")
    lookup = directory[release]
    if sae_id not in lookup.saes_map:
        ids = sorted(lookup.saes_map)
        raise ParamsError(f"SAE id {sae_id!r} is not in sae-lens release {release!r} (e.g. {ids[:5]})")
    folder = lookup.saes_map[sae_id]
    if is_pickle_name(folder):
        raise ArtifactError(f"sae-lens release {release!r} stores {sae_id!r} as {folder}, a pickle; sasgate refuses pickles")
    what = f"sae_lens:{release}/{sae_id}@{revision}"
    with pinned_hub(revision) as hub:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sae, cfg_dict, _sparsity = SAE.from_pretrained_with_cfg_and_sparsity(
                    release, sae_id, device=device, dtype="float32"
                )
        except ArtifactError:
            raise
        except Exception as exc:
            raise _fetch_error(what, hub, exc) from exc
    origin = {
        "repo": lookup.repo_id,
        "release": release,
        "sae_id": sae_id,
        "folder": folder,
        "conversion": get_conversion_loader_name(release),
        "source_files": hub.source_files(),
        # e.g. gpt2-small-res-jb expects a processed model (center_writing_weights); on record, not applied
        "model_from_pretrained_kwargs": dict(cfg_dict.get("model_from_pretrained_kwargs")
                                             or sae.cfg.metadata.model_from_pretrained_kwargs or {}),
        "expected": registry_expected(lookup, sae_id),
    }
    return sae, origin


def registry_expected(lookup: Any, sae_id: str) -> dict[str, float | None]:
    """The figures a registry release states for one SAE (pretrained_saes.yaml `variance_explained`, `l0`), or None
    where it states none (sae-lens fills the unstated ones with 1.0 and 0.0; those are read as unstated)."""
    ev = lookup.expected_var_explained.get(sae_id)
    l0 = lookup.expected_l0.get(sae_id)
    return {"var_explained": None if ev is None or float(ev) == 1.0 else float(ev),
            "l0": None if l0 is None or float(l0) == 0.0 else float(l0)}


# A registry SAE whose measured figures are this far from the release's stated ones is flagged (a mis-pinned or
# mis-loaded SAE, or another input distribution: the release measured them on its own training data).
EXPECTED_VAR_EXPLAINED_ATOL = 0.1
EXPECTED_L0_FACTOR = 2.0


def compare_expected(expected: dict[str, Any] | None, var_explained: float, l0: float) -> dict[str, Any] | None:
    """Measured explained variance and L0 against the registry's stated ones; None when nothing is stated."""
    expected = expected or {}
    ev, el0 = expected.get("var_explained"), expected.get("l0")
    if ev is None and el0 is None:
        return None
    problems = []
    if ev is not None and abs(var_explained - ev) > EXPECTED_VAR_EXPLAINED_ATOL:
        problems.append(f"explained variance {var_explained:.4g} vs stated {ev:.4g} "
                        f"(more than {EXPECTED_VAR_EXPLAINED_ATOL} apart)")
    if el0 is not None and not el0 / EXPECTED_L0_FACTOR <= l0 <= el0 * EXPECTED_L0_FACTOR:
        problems.append(f"L0 {l0:.4g} vs stated {el0:.4g} (more than a factor {EXPECTED_L0_FACTOR} apart)")
    return {"expected_var_explained": ev, "measured_var_explained": var_explained, "expected_l0": el0,
            "measured_l0": l0, "var_explained_atol": EXPECTED_VAR_EXPLAINED_ATOL, "l0_factor": EXPECTED_L0_FACTOR,
            "large_disagreement": bool(problems), "problems": problems}


def fetch_hf_folder(repo: str, path: str, revision: str, device: str = "cpu") -> tuple["SAE", dict[str, Any]]:
    """An SAE in sae-lens disk format in a Hub repo folder at a pinned commit."""
    from huggingface_hub.errors import EntryNotFoundError

    path = path.strip("/")
    what = f"hf:{repo}/{path}@{revision}"
    hub = _PinnedHub(revision)
    try:
        cfg_local = hub.download(repo, f"{path}/{SAE_CFG}")
        hub.download(repo, f"{path}/{SAE_WEIGHTS}")
    except ArtifactError:
        raise
    except EntryNotFoundError as exc:
        if "Local" not in type(exc).__name__:
            raise ArtifactError(
                f"{what} is not in sae-lens disk format: the repo has no {path}/{SAE_CFG} or {path}/{SAE_WEIGHTS} "
                "at that revision"
            ) from exc
        raise _fetch_error(what, hub, exc) from exc
    except Exception as exc:
        raise _fetch_error(what, hub, exc) from exc
    sae = load_sae_dir(Path(cfg_local).parent, device=device)
    return sae, {"repo": repo, "folder": path, "source_files": hub.source_files()}


def load_path_spec(folder: str, root: Path, device: str = "cpu") -> tuple["SAE", dict[str, Any]]:
    """`path:DIR`: a local folder in sae-lens disk format; relative to the project root unless absolute."""
    d = Path(folder)
    d = d if d.is_absolute() else root / d
    if not d.is_dir():
        raise ArtifactError(f"SAE folder {folder} (from `path:{folder}`) does not exist")
    sae = load_sae_dir(d, device=device)
    files = {p.relative_to(d).as_posix(): "sha256:" + sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}
    return sae, {"folder": folder, "source_files": files}


# --------------------------------------------------------------------------- training


def local_training_corpus(params: Params, chat: Any) -> list[str]:
    """A local model's SAE corpus: `saes.train.corpus_sequences` synthetic instructions (sasgate.instructions,
    both classes alternating, every task; `collect` checks them against the locked eval set) in the chat
    template, each followed by the model's own greedy answer of `saes.train.corpus_answer_tokens` tokens."""
    from . import instructions

    tr = params.saes.train
    by_label = [instructions.worded(lab, instructions.tasks(lab), tr.seed) for lab in ("harmful", "harmless")]
    pool = [i.text for pair in zip(*by_label) for i in pair]
    texts = [pool[i % len(pool)] for i in range(tr.corpus_sequences)]
    answers: list[str] = []
    for start in range(0, len(texts), ACTIVATION_BATCH):
        answers += chat.generate(texts[start:start + ACTIVATION_BATCH], tr.corpus_answer_tokens)
    return [chat.prompt(t) + a for t, a in zip(texts, answers)]


def training_corpus(params: Params) -> list[str]:
    """`saes.train.corpus_sequences` toy chat transcripts (prompt + response, no BOS/EOS text).

    Pairs come from the grammar's *train* split only, so no eval or selection pair is ever
    seen; classes alternate, templates and response variants cycle, pairs are drawn by a
    seeded RNG.
    """
    from .toy import grammar

    if params.model.name != TOY_MODEL:
        raise ParamsError("SAE training needs the toy grammar's corpus; only toy-refusal has one built in")
    e, tr = params.eval, params.saes.train
    pairs = grammar.partition_pairs(e.seed, e.n_eval, e.n_selection, params.model.toy.n_validation)["train"]
    by_label = {lab: [p for p in pairs if p.label == lab] for lab in ("harmful", "harmless")}
    rng = random.Random(f"sasgate.saes.corpus:{tr.seed}")
    n_t = len(grammar.TEMPLATES)
    out = []
    for i in range(tr.corpus_sequences):
        label = "harmful" if i % 2 == 0 else "harmless"
        pair = rng.choice(by_label[label])
        k = i // 2
        text = grammar.chat_prompt(grammar.instruction(pair, k % n_t)) + " " + grammar.response(pair, k // n_t)
        out.append(text)
    return out


@torch.no_grad()
def collect_training_activations(chat: Any, texts: Sequence[str], hook_names: Sequence[str],
                                 batch_size: int = ACTIVATION_BATCH) -> dict[str, torch.Tensor]:
    """float32 [n_tokens, d_model] per hook over `texts`: BOS + tokens, left-padded like `collect`;
    BOS and pad positions are dropped."""
    model = chat.model
    n_ctx = int(model.cfg.n_ctx)
    stop_at = max(int(h.split(".")[1]) for h in hook_names) + 1
    parts: dict[str, list[torch.Tensor]] = {h: [] for h in hook_names}
    keep: list[torch.Tensor] = []

    def save(act: torch.Tensor, hook: Any) -> None:
        parts[hook.name].append(act[keep[0]].detach().to("cpu", torch.float32))

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(texts), batch_size):
            rows = [([chat.bos_id] if chat.bos_id is not None else []) + chat.codec.encode(t)
                    for t in texts[start:start + batch_size]]
            width = max(len(r) for r in rows)
            if width > n_ctx:
                raise ArtifactError(f"a training sequence has {width} tokens, more than the model's n_ctx {n_ctx}")
            ids = torch.full((len(rows), width), chat.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = True
            content = mask.clone()
            if chat.bos_id is not None:  # the first real token of each row is BOS
                first = width - torch.tensor([len(r) for r in rows])
                content[torch.arange(len(rows)), first] = False
            device = chat.device
            keep[:] = [content.to(device)]
            model.run_with_hooks(ids.to(device), attention_mask=mask.to(device),
                                 fwd_hooks=[(h, save) for h in hook_names], stop_at_layer=stop_at)
    finally:
        model.train(was_training)
    return {h: torch.cat(v) for h, v in parts.items()}


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs of full batches in a seeded random order (the last partial batch is dropped)."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[s:s + batch_size]]


def _training_config(tp: SaeTrainParams, d_in: int, metadata: Any, device: str) -> Any:
    from sae_lens import JumpReLUTrainingSAEConfig, StandardTrainingSAEConfig, TopKTrainingSAEConfig

    d_sae = d_in * tp.expansion_factor
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device=device, metadata=metadata,
                  normalize_activations="expected_average_only_in")
    if tp.architecture == "topk":
        return TopKTrainingSAEConfig(k=min(tp.k, d_sae), **common)
    if tp.architecture == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=tp.l1_coefficient, **common)
    return JumpReLUTrainingSAEConfig(l0_coefficient=tp.l1_coefficient, **common)


@dataclass
class TrainResult:
    sae: Any  # the trained sae-lens TrainingSAE (activation norm folded into its weights)
    steps: int
    tokens_seen: int
    final_loss: float  # mean total loss over the last 10% of steps
    final_mse_loss: float  # mean reconstruction (mse) loss over the last 10% of steps
    losses: list[float] = field(repr=False, default_factory=list)


def train_sae(acts: torch.Tensor, tp: SaeTrainParams, hook_name: str, model_name: str,
              device: str = "cpu", context_size: int | None = None, dataset: str = CORPUS_DATASET) -> TrainResult:
    """Train one SAE on `acts` [n_tokens, d_in] with sae-lens's SAETrainer; a pure function of its inputs."""
    _quiet_sae_lens()
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.registry import get_sae_training_class

    n, d_in = acts.shape
    if n < tp.batch_size:
        raise ParamsError(
            f"the SAE training corpus gives {n} tokens at {hook_name}, fewer than saes.train.batch_size "
            f"({tp.batch_size}); raise saes.train.corpus_sequences"
        )
    steps = -(-tp.training_tokens // tp.batch_size)
    metadata = SAEMetadata(model_name=model_name, hook_name=hook_name, hook_head_index=None, prepend_bos=True,
                           context_size=context_size, dataset_path=dataset, exclude_special_tokens=True)
    cfg = _training_config(tp, d_in, metadata, device)
    sae_cls = get_sae_training_class(cfg.architecture())[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tp.seed)
        sae = sae_cls(cfg)
    losses: list[float] = []
    mse: list[float] = []

    mean = acts.to(torch.float64).mean(dim=0).to(torch.float32)

    class _Trainer(SAETrainer):  # step() is sae-lens's public per-step seam
        def step(self, batch: torch.Tensor):  # type: ignore[override]
            if self.n_training_steps == 0:
                # b_dec starts at the (scaled) mean activation, not 0 (the OpenAI / Anthropic recipe:
                # sae-lens 6 dropped b_dec_init_method). The norm scaling factor is known by now.
                with torch.no_grad():
                    self.sae.b_dec.data.copy_(self.activation_scaler.scale(mean.to(self.sae.b_dec.device)))
            out = super().step(batch)
            losses.append(float(out.loss.detach()))
            mse.append(float(out.losses["mse_loss"].detach()))
            return out

    trainer_cfg = SAETrainerConfig(
        total_training_samples=tp.training_tokens,
        train_batch_size_samples=tp.batch_size,
        lr=tp.lr,
        lr_end=tp.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        lr_decay_steps=int(steps * LR_DECAY_FRACTION),
        device=device,
        autocast=False,
        dead_feature_window=max(1, int(steps * DEAD_WINDOW_FRACTION)),
        feature_sampling_window=steps + 1,  # one window over the whole run: its L0 goes into cfg metadata
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=NORM_ESTIMATE_BATCHES,
    )
    trainer = _Trainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(acts, tp.batch_size, tp.seed))
    with warnings.catch_warnings(), _no_progress_bars():
        warnings.simplefilter("ignore", UserWarning)
        sae = trainer.fit()
    tail = max(1, len(losses) // 10)
    return TrainResult(sae=sae, steps=trainer.n_training_steps, tokens_seen=trainer.n_training_samples,
                       final_loss=sum(losses[-tail:]) / tail, final_mse_loss=sum(mse[-tail:]) / tail, losses=losses)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """sae-lens's trainer draws tqdm bars on stderr; a DVC stage log is easier to read without them."""
    import functools

    from sae_lens.training import activation_scaler, sae_trainer

    saved = {m: m.tqdm for m in (sae_trainer, activation_scaler)}
    for m, bar in saved.items():
        m.tqdm = functools.partial(bar, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, bar in saved.items():
            m.tqdm = bar  # type: ignore[attr-defined]


@torch.no_grad()
def sae_stats(sae: "SAE", acts: torch.Tensor, batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """nMSE (fraction of variance unexplained), mean L0 and dead latents of an SAE on activations."""
    from .nmse import reconstruct

    x_hat, l0, fired = reconstruct(sae, acts, batch_size=batch_size, return_fired=True)
    x = acts.to(torch.float64)
    resid = (x - x_hat.to(torch.float64)).pow(2).sum()
    total = (x - x.mean(dim=0)).pow(2).sum()
    return {"nmse": float(resid / total), "l0": float(l0.to(torch.float64).mean()),
            "dead_latents": int((~fired).sum())}


# --------------------------------------------------------------------------- one tuple


def model_d_model(params: Params, paths: Paths | None = None) -> int:
    """The residual width every SAE must read: the toy's from params (checked against its config
    when it loads), a local model's from its converted config (artifacts/model), a Hub model's from
    its transformer-lens config at the pinned revision."""
    if params.model.name == TOY_MODEL:
        return params.model.toy.d_model
    if params.model.name == LOCAL_MODEL:
        if paths is None:
            raise ArtifactError("a local model's width is read from artifacts/model: pass the project's paths")
        cfg = read_json(paths.model_dir / "config.json")
        return int(cfg["hooked_transformer_config"]["d_model"])
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(params.model.name)
        cfg = loading.get_pretrained_model_config(official, revision=params.model.revision)
    except Exception as exc:
        raise ArtifactError(
            f"cannot read the config of {params.model.name}@{params.model.revision} to check SAE widths: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return int(cfg.d_model)


def source_record(params: Params, tp: TupleParams, sae: "SAE", origin: dict[str, Any], files: dict[str, str],
                  checks: dict[str, Any], training: dict[str, Any] | None) -> dict[str, Any]:
    spec = tp.sae_spec()
    return {
        "schema": SOURCE_SCHEMA,
        "tuple": {"key": tp.key, "model": params.model.name, "layer": tp.layer, "site": tp.site,
                  "hook_name": tp.hook_name},
        "spec": tp.sae,
        "kind": spec["kind"],
        "revision": spec.get("revision"),
        "origin": origin,
        "files": files,
        "sae": _describe_sae(sae),
        "checks": checks,
        "training": training,
    }


def write_source(folder: Path, record: dict[str, Any]) -> None:
    atomic_write_json(folder / SOURCE_FILE, record)


def fetch_for_tuple(params: Params, paths: Paths, tp: TupleParams, device: str = "cpu") -> tuple["SAE", dict[str, Any]]:
    """Load the SAE named by a non-`train` spec; returns (sae, origin record)."""
    spec = tp.sae_spec()
    kind = spec["kind"]
    if kind == "sae_lens":
        return fetch_sae_lens(spec["release"], spec["sae_id"], spec["revision"], device=device)
    if kind == "hf":
        return fetch_hf_folder(spec["repo"], spec["path"], spec["revision"], device=device)
    if kind == "path":
        return load_path_spec(spec["dir"], paths.root, device=device)
    raise ValueError(f"fetch_for_tuple does not train; spec {tp.sae!r}")


def stats_for_log(losses: list[float], every: int = 50) -> list[float]:
    """A short loss curve for metrics (every `every`-th step), rounded."""
    return [round(v, 6) for v in losses[::every]]

