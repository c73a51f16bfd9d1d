"""The method interface and registry shared by SAN and the baselines."""
