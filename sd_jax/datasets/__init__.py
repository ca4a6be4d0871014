"""TFDS dataset builders (prepared as array_record, read with grain; no TensorFlow needed): the generated
"shapes" set and image folders with captions."""
