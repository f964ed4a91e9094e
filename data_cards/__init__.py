"""The data cards that ship with medda (installed as `medda.data_cards`; see medda/resources.py)."""
