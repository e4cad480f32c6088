from edgepack.cli import console

console()
