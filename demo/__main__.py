from demo.steps import main

raise SystemExit(main())
