from imgclf.cli import run

run()
