"""Tools that turn pretraining workdirs into the figures and tables of the results page."""
