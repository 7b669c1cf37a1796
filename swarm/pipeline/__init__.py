"""Pipeline training without network: data order, schedules, stage execution, optimiser, reference trainer."""
