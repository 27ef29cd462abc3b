"""skd actors: teacher actors, the teacher pool, knowledge requests, the teachers manifest."""
