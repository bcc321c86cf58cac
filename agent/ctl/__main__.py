import sys

from agent.ctl.cli import main

sys.exit(main())
