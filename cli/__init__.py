"""Command-line programs over the library: the engine alone (`cli.train`), preprocessing (`cli.preprocess`) and the
verl-key translator of the reference script (`cli.verl_keys`). Each prints one `error:` line for a user error."""
