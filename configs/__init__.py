"""The recipes that ship with medda (installed as `medda.configs`; see medda/resources.py)."""
