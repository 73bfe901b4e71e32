"""The benchmark suite; the code lives in the package (vlmkit.bench.suite) so that
`vlmkit bench` works wherever vlmkit is installed. Same arguments."""
import sys

from vlmkit.bench.suite import main

sys.exit(main())
