"""Load benchmarks of Soma Mesh: h2load runner (run.py), ghz scenarios (scenarios/)."""
