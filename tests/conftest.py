"""Shared by every test folder: pytest puts this folder on sys.path (the default `prepend`
import mode), so the helpers here (tiny_hparams, toy_methods, workflow_rules) import from
tests/cluster/ as well."""
