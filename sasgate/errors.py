"""Error types, each with its own exit code, so scripts and cron can tell failures apart."""


class SasgateError(Exception):
    """Base class: one clear message, one distinct exit code."""

    exit_code = 1


class ParamsError(SasgateError):
    """params.yaml is invalid: names the key, the value and what was expected."""

    exit_code = 2


class LockedSetError(SasgateError):
    """The resolved evaluation set (or another locked input) differs from its lock file."""

    exit_code = 3


class LeakageError(SasgateError):
    """An item appears in both the selection and the eval split."""

    exit_code = 4


class ArtifactError(SasgateError):
    """An input artifact is missing, corrupt, or does not match its manifest."""

    exit_code = 5


class DataError(SasgateError):
    """An evaluation-set source could not be read or has the wrong shape."""

    exit_code = 6


class ScorerTamperedError(SasgateError):
    """A released scorer version's code no longer matches its recorded hash: add a new version instead."""

    exit_code = 7


class PreregistrationError(SasgateError):
    """Remediation without a preregistration, or the stop rules changed after it."""

    exit_code = 8


# --- archive (sasgate archive) ---
class NotVerifiedError(SasgateError):
    """A bundle failed verification (fail closed): the message names the first offending file."""

    exit_code = 1


class WorkspaceMismatchError(SasgateError):
    """Export refused: the workspace does not match dvc.lock or the sha256 manifests (stale or modified)."""

    exit_code = 20


class KeyFileError(SasgateError):
    """A signing key is unreadable, not Ed25519, passphrase-protected without a passphrase, or readable by others."""

    exit_code = 21


# --- behaviour stages (issue 3: directions, features) ---
class SelectionError(SasgateError):
    """Nothing to steer with: no DIM candidate survives Arditi's rule, or no SAE latent separates the classes."""

    exit_code = 9


# --- watcher (issue 4: sasgate watch) ---
class HubUnreachableError(SasgateError):
    """The Hub could not be read (network error, HTTP 5xx/429 after retries, malformed JSON): no claim is made.

    75 is EX_TEMPFAIL (sysexits.h): cron wrappers treat it as "try again later"."""

    exit_code = 75


# --- decision (issue 12): records that contradict themselves or each other ---
class RecordConsistencyError(SasgateError):
    """A gate record contradicts its own rows, the required tuples or another record: `decide` refuses."""

    exit_code = 11


# --- preregistration (issue 12): the RFC 3161 timestamp over the lock ---
class TimestampError(SasgateError):
    """A preregistration timestamp token is missing its TSA certificate, malformed, or covers another digest."""

    exit_code = 12


# --- local models (issue 16) ---
class ModelFileError(SasgateError):
    """A local model file is missing or its sha256 differs from `model.sha256` (both digests named)."""

    exit_code = 13


# --- sweeps (issue 18): sasgate sweep ---
class SweepError(SasgateError):
    """A sweep could not be submitted or collected (no git/DVC remote, a dirty tree, a failed point)."""

    exit_code = 14
