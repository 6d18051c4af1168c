from drrl.cli import main

raise SystemExit(main())
