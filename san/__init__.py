"""SAN-PEFT bench: parameter-efficient fine-tuning of vision backbones on VTAB-1K and FGVC.

Importing the package imports nothing else: records, reports and planning stay light.
Methods are found through the `san_peft.methods` entry points (san.methods.registry).
"""
