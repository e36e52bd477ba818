"""Lightning modules, one per training job, and the callbacks they share."""
