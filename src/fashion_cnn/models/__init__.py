"""The model layer: specs in Keras' vocabulary (spec.py), one registry entry per layer type
(layers.py), the builder (build.py), the zoo's specs (zoo.py) and the CPU kernels (kernels/).
Imports only from the data layer and the ground floor."""
