from microvm_run.cli import main

raise SystemExit(main())
