from instructrl.cli import main

raise SystemExit(main())
