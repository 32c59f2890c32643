"""Soma Mesh: hand-written services. Generated code lives in gen/python (package `soma`)."""
