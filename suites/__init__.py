"""Suite files (TOML). They live at the top of the repository; `pip install .` ships them as the package
`moebench.suites` (pyproject.toml's package-dir), so an installed moebench finds them too."""
