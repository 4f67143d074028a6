from tokenwise_harness.cli import main

raise SystemExit(main())
