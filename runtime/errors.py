"""The one family of user-facing errors.

Every problem a user can cause or fix (bad input, a missing or corrupt file, a full artifact, an
absent device) is raised as a subclass of :class:`CareError`. The CLI prints such errors as one
line without a traceback; anything else is a bug and keeps its traceback.
"""


class CareError(Exception):
    """A problem the user can fix, shown as one line."""


class CheckpointError(CareError):
    """A checkpoint directory is missing, incomplete, corrupt or of an unknown format."""


class ArtifactError(CareError):
    """An exported artifact is missing, incomplete, corrupt or of an unknown format."""


class InputError(CareError):
    """Input data has the wrong shape, dtype or values."""


class CapacityError(CareError):
    """An artifact has no room left for another task (or task size)."""


class ClosedError(CareError):
    """A Session was used after ``close()``."""


class BackendError(CareError):
    """A requested device or backend is not available here."""


class ValidationError(CareError):
    """Two implementations disagree beyond the stated tolerance."""


class ShapeError(ValidationError):
    """Outputs have different shapes."""


class AtolError(ValidationError):
    """Outputs differ by more than the absolute tolerance."""


class RoutingError(ValidationError):
    """Routing decisions (selected tasks or experts) differ."""


class MismatchError(CareError):
    """A checkpoint does not belong to an artifact (other backbone, BR-MoE settings or older tasks)."""
