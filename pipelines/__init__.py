"""Command-line pipelines: parse a config, call `medda.api`, print what a user needs to see."""
