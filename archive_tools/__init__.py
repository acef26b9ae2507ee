"""Tools that create input archives: the synthetic generator and the image-folder importer."""
