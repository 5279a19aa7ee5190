"""One file per method. Each defines one AdapterLayer subclass."""
