from setuptools import Extension
from setuptools import setup

# The opcode walk in C (compositestorage/_opcodes.c).  Optional: where no
# compiler is found the build goes on without it, and compositestorage
# uses the same walk in Python (compositestorage.opcodes.walk_python).
setup(ext_modules=[
    Extension('compositestorage._opcodes', ['compositestorage/_opcodes.c'],
              optional=True),
])
