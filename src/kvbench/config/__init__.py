"""Config loading, validation and the job table (the public import surface of kvbench.config).

`load_config(path)` parses YAML (duplicate keys, and keys YAML reads as numbers or booleans, are
errors: `load_yaml`), checks every name that becomes a path component (`check_name`: no `.`, `..`,
`/`, at most 64 characters) and every number (integers are integers, below 2^31; no NaN or
infinity), validates it against workflow/schemas/config.schema.yaml (errors name the key), fills
defaults, then checks what a schema cannot, all without building or loading anything: every model
source parses (scheme, pinned hub revision, local folder outside the workflow's outputs, builtin
recipe, random architecture); every name a study uses exists; method parameters match the method
dataclass fields in name and type and pass the method's own checks (every defined method, used or
not); budgets fit the methods; lengths fit the models' maximum positions and hold at least one
synthetic sentence pair; quantization group sizes divide the models' head_dim; hf translation
datasets name known languages; target offsets and latency decode steps stay within the models'
positions. Soft problems are one-line warnings on stderr (`warn`): a budget at or above a
length, a study that plans no job, names that differ only by case, parameters a method or task
ignores. `job_table(cfg)` is the union of all studies' grids, deduplicated: one entry per eval
output path.

Modules: `base` (errors, warnings, names, integers), `load` (YAML, schema, defaults), `checks` and
`sources` (what a schema cannot say), `method_checks` (method entries), `jobs` (the job table).
"""

from ..job import INT_MAX, Budget, Job, config_hash, job_config  # noqa: F401 - re-exported (workflow, tests)
from .base import (  # noqa: F401
    MAX_PROMPTS,
    MAX_SAMPLES,
    NAME_MAX,
    SECTIONS,
    ConfigError,
    _check_values,
    check_int,
    check_name,
    parse_budget,
    reset_warnings,
    warn,
)
from .jobs import dataset_kind, dataset_tasks, job_table, study_jobs  # noqa: F401
from .load import SCHEMA, load_config, load_yaml, merge_configs, validate_config  # noqa: F401
from .method_checks import IGNORED_FIELDS, check_geometry, check_method, string_choices  # noqa: F401
