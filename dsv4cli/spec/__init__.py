"""Spec layer: TOML loading, pydantic schema, cross-field rules and estimates (never imports torch).

schema      pydantic models of every TOML section (the field names are a contract)
load        load_spec / resolve_spec / spec_to_toml: extends chains, --set, key origins
chain       a spec file and its extends chain: merged data, key origins, relative paths, TOML errors
overrides   --set KEY=VALUE: parse_override and applying them in order
schema_problems  pydantic's validation errors -> Problems (did-you-mean for unknown keys)
toml_lines  key -> line numbers of a TOML document
problems    Problem (FILE:LINE: key: message), SpecError, Origin (file, line) of a key
rules       cross-field rules; UNSUPPORTED features (warn in validate, error in train, check_supported)
check       check_spec: everything `dsv4 validate` reports for one spec
layout      world size, derived dp / expert grid, pp_layout parsing
estimate    param_inventory, parameter counts, FLOPs per token, memory per rank
dsv4_estimate  DeepSeek-V4 attention ([model.attention]) terms of the estimates
dsv4_params  DeepSeek-V4 parameter counts per component (equal to HF's DeepseekV4ForCausalLM)
launch_cmd  the torchrun argv `dsv4 train` runs
docs        docs/spec.md generated from the schema
"""

from dsv4cli.spec.schema import Spec  # noqa: F401
