# The two commands of the README. Both set up what they need.
.PHONY: demo test lint

demo:
	scripts/setup.sh
	cargo run --bin idem -- demo

test:
	scripts/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
