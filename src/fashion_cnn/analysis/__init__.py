"""The analysis layer: metrics (pure numbers), figures (arrays in, Figures out), a run's
figure files, studies and their report. Imports only from the layers below it."""
